"""Demo dataset builders on the real data that installs offline (nilearn MNI152, stardist nuclei, InVesalius CT)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from samadapt.data.demo_data import (DEMO_DATASETS, INVESALIUS_CANDIDATES, build_demo, build_invesalius_ct,
                                     build_mni152, build_nuclei, mni152_volumes)
from samadapt.data.readers import open_dataset
from samadapt.data.slices import SliceDataset
from samadapt.errors import ConfigError, InputError


@pytest.fixture(scope="module")
def mni_brain(tmp_path_factory):
    return build_mni152(tmp_path_factory.mktemp("demo") / "Dataset001_MNI152Brain", task="brain")


def test_mni152_slabs_do_not_overlap_and_split_by_default(mni_brain):
    ds = open_dataset(mni_brain)
    meta = json.loads((mni_brain / "dataset.json").read_text())
    assert meta["channel_names"] == {"0": "T1"} and meta["labels"] == {"background": 0, "brain": 1}
    assert meta["numTraining"] == 3 and meta["file_ending"] == ".nii.gz"
    split = ds.make_split()
    assert (split.train, split.val, split.test) == (["mni152_train"], ["mni152_val"], ["mni152_test"])
    cases = {c: ds.load(c) for c in ds.case_ids}
    sizes = {c: case.shape[0] for c, case in cases.items()}
    total = sum(sizes.values())
    assert abs(sizes["mni152_train"] / total - 0.6) < 0.01 and abs(sizes["mni152_test"] / total - 0.3) < 0.01
    # slabs are contiguous, non-overlapping and sit at their true position (origin z in mm)
    z = {c: case.origin[2] for c, case in cases.items()}
    assert z["mni152_val"] == z["mni152_train"] + sizes["mni152_train"]
    assert z["mni152_test"] == z["mni152_val"] + sizes["mni152_val"]
    t1, label, _ = mni152_volumes("brain")
    start = int(z["mni152_train"] - (-72.0))
    np.testing.assert_array_equal(cases["mni152_train"].image[0], t1[start:start + sizes["mni152_train"]])
    for case in cases.values():
        assert case.modality == "MR" and case.label.any(axis=(1, 2)).all()  # every slab slice has brain
    assert label[:start].sum() == 0  # nothing with brain was left below the train slab


def test_mni152_is_reused_and_feeds_slices(mni_brain):
    stamp = (mni_brain / "dataset.json").stat().st_mtime_ns
    assert build_mni152(mni_brain, task="brain") == mni_brain
    assert (mni_brain / "dataset.json").stat().st_mtime_ns == stamp
    with pytest.raises(InputError, match="another dataset"):
        build_mni152(mni_brain, task="tissue")
    case = open_dataset(mni_brain).load("mni152_val")
    item = SliceDataset([case], 64)[0]
    assert item["image"].shape == (3, 64, 64) and set(item["label"].unique().tolist()) == {0, 1}


def test_mni152_tissue_labels(tmp_path):
    _, tissue, _ = mni152_volumes("tissue")
    _, brain, _ = mni152_volumes("brain")
    assert set(np.unique(tissue).tolist()) == {0, 1, 2, 3}
    np.testing.assert_array_equal(tissue > 0, brain > 0)
    counts = np.bincount(tissue.ravel())
    assert counts[2] > counts[1] and counts[3] > counts[1]  # grey and white matter dominate the brain


def test_nuclei_tiles_both_formats(tmp_path):
    root = build_nuclei(tmp_path / "nuclei", tile=128)
    ds = open_dataset(root)
    assert len(ds.case_ids) == 16 and ds.labels == {"background": 0, "nucleus": 1}
    split = ds.make_split()
    assert len(split.train) == 10 and len(split.val) == 2 and len(split.test) == 4
    case = ds.load("nuclei_r1_c2")
    assert case.image.shape == (1, 1, 128, 128) and case.is_2d and case.label.sum() > 0
    folder = open_dataset(build_nuclei(tmp_path / "nuclei2d", tile=256, format="folder2d"))
    assert folder.format == "folder2d" and len(folder.case_ids) == 4
    assert folder.load("nuclei_r0_c0").label.max() == 1


def test_demo_registry_and_errors(tmp_path):
    shifted = {f"mni152-{task}-{shift}" for task in ("brain", "tissue")
               for shift in ("bias", "gamma", "gibbs", "blur", "lowres", "noise")}
    assert set(DEMO_DATASETS) == {"mni152-brain", "mni152-tissue", "nuclei", "invesalius-ct", "mni152-brain-2mm",
                                  "mni152-brain-3mm", *shifted}
    with pytest.raises(ConfigError):
        build_demo("imagenet", tmp_path)
    (tmp_path / "occupied").mkdir()
    (tmp_path / "occupied" / "x.txt").write_text("user data")
    with pytest.raises(InputError, match="no dataset.json"):
        build_demo("nuclei", tmp_path / "occupied")
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folder left


HAS_INVESALIUS = any(__import__("os").path.isfile(p) for p in INVESALIUS_CANDIDATES)


@pytest.mark.skipif(not HAS_INVESALIUS, reason="Debian package invesalius-examples not installed")
def test_invesalius_ct(tmp_path):
    root = build_invesalius_ct(tmp_path / "ct")
    ds = open_dataset(root)
    case = ds.load("cranium")
    assert ds.modality == "CT" and case.shape == (108, 256, 256)
    assert case.spacing == pytest.approx((1.5, 0.957, 0.957), abs=1e-3)
    assert case.image.min() >= -1024 and case.image.max() > 1000  # real HU
    assert set(np.unique(case.label).tolist()) == {0, 1, 2}
    np.testing.assert_array_equal(case.label == 2, case.image[0] >= 226)


def test_invesalius_missing_gives_clear_error(tmp_path, monkeypatch):
    import samadapt.data.demo_data as demo

    monkeypatch.setattr(demo, "INVESALIUS_CANDIDATES", (str(tmp_path / "absent" / "Cranium.inv3"),))
    with pytest.raises(InputError, match="apt-get install invesalius-examples"):
        demo.build_invesalius_ct(tmp_path / "ct")
    assert not (tmp_path / "ct").exists()
