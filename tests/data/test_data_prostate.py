"""The multi-site prostate layout (six site folders of CaseNN + CaseNN_segmentation NIfTI) and DeSAM's
single-source protocol on it (train on one site with a 90/10 patient split, one DG row per other site)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk

from samadapt.data.readers import detect_format, open_dataset
from samadapt.data.readers.prostate import SITES, prostate_sites, site_letter
from samadapt.errors import InputError

FOLDERS = {"A": "RUNMC", "B": "BMC", "C": "I2CVB", "D": "UCL", "E": "BIDMC", "F": "HK"}


def _write(path, array, spacing=(0.6, 0.6, 3.0)):
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(spacing)
    sitk.WriteImage(image, str(path))


def make_sites(root, cases=3, shape=(4, 40, 40), mask_suffix="_segmentation", folders=FOLDERS, seed=0, first=None):
    """Six sites (``first`` cases in the first one, default ``cases``); site k has another scanner gain and a centred
    disc 'prostate' on the middle slices."""
    rng = np.random.default_rng(seed)
    z, y, x = shape
    yy, xx = np.mgrid[:y, :x]
    for k, (letter, name) in enumerate(folders.items()):
        site = root / name
        site.mkdir(parents=True)
        for i in range(first if (first and k == 0) else cases):
            r = rng.integers(6, 10)
            disc = ((yy - y // 2) ** 2 + (xx - x // 2) ** 2 < r * r)
            mask = np.zeros(shape, np.uint8)
            mask[1:z - 1] = disc
            image = (200 + 40 * k) * (0.3 + mask) + rng.normal(0, 10, shape)
            _write(site / f"Case{i:02d}.nii.gz", image.astype(np.int16))
            _write(site / f"Case{i:02d}{mask_suffix}.nii.gz", mask)
    return root


def test_sites_are_found_by_name_or_letter(tmp_path):
    assert [site_letter(n) for n in ("RUNMC", "bmc", "HCRUDB", "I2CVB", "d", "BIDMC", "HK", "other")] == [
        "A", "B", "C", "C", "D", "E", "F", None]
    root = make_sites(tmp_path / "p", cases=1, folders={"A": "A", "B": "BMC"})
    assert {k: p.name for k, p in prostate_sites(root).items()} == {"A": "A", "B": "BMC"}
    (root / "b").mkdir()
    with pytest.raises(InputError, match="site B twice"):
        prostate_sites(root)
    with pytest.raises(InputError, match="no prostate site folder"):
        prostate_sites(tmp_path / "p" / "A")


def test_layout_read_without_conversion(tmp_path):
    root = make_sites(tmp_path / "prostate")
    assert detect_format(root) == "prostate-sites" and detect_format(root / "RUNMC") == "prostate-site"
    site = open_dataset(root / "BMC")
    assert site.format == "prostate-site" and site.site == "B" and site.case_ids == ["Case00", "Case01", "Case02"]
    case = site.load("Case01")
    assert case.image.shape == (1, 4, 40, 40) and case.label.shape == (4, 40, 40) and case.modality == "MR"
    assert set(np.unique(case.label)) == {0, 1} and not case.label[0].any() and case.label[1].any()
    assert np.allclose(case.spacing, (3.0, 0.6, 0.6))
    pooled = open_dataset(root)
    assert pooled.format == "prostate-sites" and len(pooled.case_ids) == 18 and pooled.case_ids[0] == "A/Case00"
    assert sorted(pooled.sites) == sorted(SITES) and not pooled.warnings
    assert np.array_equal(pooled.load("B/Case01").label, case.label)
    with pytest.raises(InputError, match="no case"):
        pooled.load("Z/Case00")


def test_capitalised_masks_and_255_masks(tmp_path):
    root = make_sites(tmp_path / "p", cases=2, mask_suffix="_Segmentation", folders={"F": "HK"})
    mask = root / "HK" / "Case00_Segmentation.nii.gz"
    _write(mask, sitk.GetArrayFromImage(sitk.ReadImage(str(mask))) * 255)
    site = open_dataset(root / "HK")
    assert site.case_ids == ["Case00", "Case01"] and set(np.unique(site.load("Case00").label)) == {0, 1}
    pooled = open_dataset(root)
    assert any("A, B, C, D, E not found" in w for w in pooled.warnings)


def test_bad_site_folders_name_the_file(tmp_path):
    root = make_sites(tmp_path / "p", cases=2, folders={"D": "UCL"})
    _write(root / "UCL" / "Case00_segmentation.nii.gz", np.full((4, 40, 40), 3, np.uint8))
    with pytest.raises(InputError, match="Case00_segmentation.nii.gz.*mask values"):
        open_dataset(root / "UCL").load("Case00")
    (root / "UCL" / "Case01_segmentation.nii.gz").unlink()
    with pytest.raises(InputError, match="Case01.nii.gz.*no mask"):
        open_dataset(root / "UCL", "prostate-site")


def test_single_source_protocol_one_row_per_other_site(tmp_path):
    from samadapt.config.run_config import load_config
    from samadapt.engine.run import train
    from samadapt.evaluation.protocols.domain_generalisation import evaluate_domain_generalisation, site_targets

    root = make_sites(tmp_path / "prostate", cases=1, first=10, shape=(3, 32, 32))
    assert [s.split("=")[0] for s in site_targets(root, root / "RUNMC")] == [
        "B BMC", "C I2CVB", "D UCL", "E BIDMC", "F HK"]
    split = open_dataset(root / "RUNMC").make_split(val_fraction=0.1, test_fraction=0.0)
    assert (len(split.train), len(split.val), len(split.test)) == (9, 1, 0)  # the 90/10 patient split
    options = {"channels": [16, 8, 4], "se_reduction": 4, "mode": "box"}
    cfg = load_config(None, ["backbone.name=tiny", "method.name=desam",
                             *[f"method.options.{k}={json.dumps(v)}" for k, v in options.items()],
                             f"data.path={root / 'RUNMC'}", "data.val_fraction=0.1", "data.test_fraction=0",
                             "data.cache=off", "train.epochs=1", "train.batch_size=4", "train.device=cpu",
                             f"output={tmp_path / 'run'}"])
    train(cfg)
    rows = evaluate_domain_generalisation(tmp_path / "run", [], tmp_path / "dg", sites=root, gt_slices_only=True,
                                          border_px=50, device="cpu", use_cache=False)
    assert [r["target"] for r in rows] == ["B BMC", "C I2CVB", "D UCL", "E BIDMC", "F HK"]
    assert all(r["domain"] == "target" and r["cases"] == 1 and 0.0 <= r["dice"] <= 1.0 for r in rows)
    assert (tmp_path / "dg" / "dg_table.csv").read_text().count("\n") == 6
