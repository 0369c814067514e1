"""The Synapse reader (train_npz/ + test_vol_h5/ + lists_Synapse/) on small generated files of that layout."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest

from samadapt.data.preprocessing import IntensityConfig
from samadapt.data.readers import detect_format, open_dataset
from samadapt.data.readers.synapse import SYNAPSE_LABELS, SynapseSource
from samadapt.data.slices import SliceDataset
from samadapt.errors import InputError

PATIENTS = ("case0005", "case0006", "case0007", "case0009")
TEST_VOLUMES = ("case0001", "case0002")


def _slice(rng: np.random.Generator, organ: int, size: int = 24) -> tuple[np.ndarray, np.ndarray]:
    """A [0, 1] float32 image (TransUNet's preprocessed values) with one square of class ``organ``."""
    image = rng.random((size, size)).astype(np.float32) * 0.2
    label = np.zeros((size, size), np.uint8)
    label[6:14, 5:15] = organ
    image[label > 0] += 0.6
    return image, label


def write_synapse(root: Path, lists: str | None = "lists_Synapse", slices: int = 3) -> Path:
    """Four training patients of ``slices`` slices each and two 5-slice test volumes, in the Synapse layout."""
    rng = np.random.default_rng(0)
    (root / "train_npz").mkdir(parents=True)
    (root / "test_vol_h5").mkdir()
    train = []
    for p, patient in enumerate(PATIENTS):
        for s in range(slices):
            name = f"{patient}_slice{s:03d}"
            image, label = _slice(rng, organ=1 + (p + s) % 8)
            np.savez(root / "train_npz" / f"{name}.npz", image=image, label=label)
            train.append(name)
    for v, name in enumerate(TEST_VOLUMES):
        pairs = [_slice(rng, organ=1 + (v + z) % 8) for z in range(5)]
        with h5py.File(root / "test_vol_h5" / f"{name}.npy.h5", "w") as f:
            f["image"] = np.stack([a for a, _ in pairs])
            f["label"] = np.stack([b for _, b in pairs]).astype(np.float32)  # TransUNet stores float labels
    if lists is not None:
        folder = root / lists
        folder.mkdir(parents=True)
        (folder / "train.txt").write_text("\n".join(train) + "\n")
        (folder / "test_vol.txt").write_text("\n".join(TEST_VOLUMES) + "\n")
        (folder / "train_220.txt").write_text("\n".join(train[::3]) + "\n")
    return root


def test_reads_the_layout_without_conversion(tmp_path):
    root = write_synapse(tmp_path / "Synapse")
    assert detect_format(root) == "synapse"
    source = open_dataset(root)
    assert isinstance(source, SynapseSource)
    assert source.labels == SYNAPSE_LABELS and source.num_classes == 8
    assert source.train_case_ids[:2] == ["case0005_slice000", "case0005_slice001"]
    assert len(source.train_case_ids) == 12 and source.test_sets == {"test_vol": list(TEST_VOLUMES)}
    assert any("no voxel spacing" in w for w in source.warnings)

    slice_case = source.load("case0006_slice002")
    assert slice_case.is_2d and slice_case.image.shape == (1, 1, 24, 24) and slice_case.label.shape == (1, 24, 24)
    with np.load(root / "train_npz" / "case0006_slice002.npz") as npz:
        np.testing.assert_array_equal(slice_case.image[0, 0], npz["image"])
        np.testing.assert_array_equal(slice_case.label[0], npz["label"])
    volume = source.load("case0002")
    assert not volume.is_2d and volume.image.shape == (1, 5, 24, 24) and volume.label.dtype == np.uint8
    assert volume.spacing == (1.0, 1.0, 1.0) and set(np.unique(volume.label)) == {0, 2, 3, 4, 5, 6}
    assert source.case_files("case0001")["image"] == [root / "test_vol_h5" / "case0001.npy.h5"]

    # [0, 1] values pass unchanged with intensity_mode none (the release's input)
    ds = SliceDataset([slice_case], 32, intensity=IntensityConfig(mode="none"))
    item = ds[0]
    assert item["image"].shape == (3, 32, 32) and int(item["label"].max()) == slice_case.label.max()


def test_split_keeps_patients_whole_and_tests_on_test_vol(tmp_path):
    source = open_dataset(write_synapse(tmp_path / "Synapse"))
    split = source.make_split(val_fraction=0.25, seed=1)
    assert split.test == list(TEST_VOLUMES)
    assert len(split.val) == 3 and len(split.train) == 9  # one of four patients, all of its slices
    val_patients = {cid.split("_slice")[0] for cid in split.val}
    assert len(val_patients) == 1 and not any(cid.split("_slice")[0] in val_patients for cid in split.train)
    assert split.extra["val_patients"] == sorted(val_patients)


def test_lists_folder_under_lists_and_another_training_list(tmp_path):
    root = write_synapse(tmp_path / "Synapse", lists="lists/lists_Synapse")
    assert open_dataset(root).train_case_ids[0] == "case0005_slice000"
    few = SynapseSource(root, train_list="train_220.txt")
    assert few.train_case_ids == ["case0005_slice000", "case0006_slice000", "case0007_slice000", "case0009_slice000"]
    with pytest.raises(InputError, match="train_10.txt.*list file not found"):
        SynapseSource(root, train_list="train_10.txt")


def test_without_lists_every_file_is_used_with_a_warning(tmp_path):
    source = open_dataset(write_synapse(tmp_path / "Synapse", lists=None))
    assert len(source.train_case_ids) == 12 and source.test_sets["test_vol"] == list(TEST_VOLUMES)
    assert any("no lists_Synapse" in w for w in source.warnings)


def test_bad_input_names_the_file(tmp_path):
    root = write_synapse(tmp_path / "Synapse")
    (root / "lists_Synapse" / "test_vol.txt").write_text("case0001\ncase0099\n")
    with pytest.raises(InputError, match=r"test_vol.txt.*case0099"):
        open_dataset(root)
    (root / "lists_Synapse" / "test_vol.txt").write_text("case0001\n")
    np.savez(root / "train_npz" / "case0005_slice001.npz", image=np.zeros((24, 24), np.float32),
             label=np.full((24, 24), 9, np.uint8))  # an id outside TransUNet's 8 organs
    source = open_dataset(root)
    with pytest.raises(InputError, match=r"case0005_slice001.npz.*label values \[9\]"):
        source.load("case0005_slice001")
    (root / "test_vol_h5" / "case0001.npy.h5").write_bytes(b"not hdf5")
    with pytest.raises(InputError, match=r"case0001.npy.h5.*cannot read HDF5"):
        source.load("case0001")
    with pytest.raises(InputError, match="not the Synapse layout"):
        SynapseSource(tmp_path)


def test_nonfinite_policy_reaches_the_cases(tmp_path):
    root = write_synapse(tmp_path / "Synapse")
    image = np.zeros((24, 24), np.float32)
    image[3, 4] = np.nan
    np.savez(root / "train_npz" / "case0007_slice000.npz", image=image, label=np.zeros((24, 24), np.uint8))
    with pytest.raises(InputError, match="case0007_slice000"):
        open_dataset(root).load("case0007_slice000")
    replaced = open_dataset(root, nonfinite="zero").load("case0007_slice000")
    assert np.isfinite(replaced.image).all() and replaced.meta["nonfinite_replaced"] == 1
