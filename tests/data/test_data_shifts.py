"""Simulated scanner shifts: deterministic per seed, same shape and range, each a real change; shifted demo targets."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk

from samadapt.data.demo_data import DEMO_DATASETS, build_demo
from samadapt.data.shifts import SHIFTS, apply_shift
from samadapt.errors import ConfigError


def _phantom() -> np.ndarray:
    """A 6 x 48 x 40 volume in [10, 110]: a bright ellipse with a dark core on a dim background."""
    z, y, x = np.mgrid[0:6, 0:48, 0:40].astype(np.float32)
    r = ((y - 24) / 18) ** 2 + ((x - 20) / 14) ** 2
    return (10 + 60 * (r < 1) + 40 * (r < 0.3) - 20 * (r < 0.1)).astype(np.float32)


@pytest.mark.parametrize("name", sorted(SHIFTS))
def test_each_shift_changes_the_volume_deterministically_within_its_range(name):
    v = _phantom()
    a, b = apply_shift(v, name, seed=0), apply_shift(v, name, seed=0)
    assert a.shape == v.shape and a.dtype == np.float32
    assert np.array_equal(a, b)  # fixed seed: the same target every time it is built
    assert v.min() <= a.min() and a.max() <= v.max()  # the source's intensity range
    change = np.abs(a - v).mean() / (v.max() - v.min())
    assert change > 0.005, f"{name} leaves the volume almost unchanged ({change:.4f})"


def test_random_shifts_depend_on_the_seed_and_unknown_names_fail():
    v = _phantom()
    assert not np.array_equal(apply_shift(v, "noise", 0), apply_shift(v, "noise", 1))
    assert not np.array_equal(apply_shift(v, "bias", 0), apply_shift(v, "bias", 1))
    with pytest.raises(ConfigError, match="unknown shift 'mri'"):
        apply_shift(v, "mri")


def test_shifted_mni152_target_keeps_labels_and_slabs(tmp_path):
    assert {f"mni152-tissue-{s}" for s in SHIFTS} <= set(DEMO_DATASETS)
    source = build_demo("mni152-tissue", tmp_path / "src")
    shifted = build_demo("mni152-tissue-gamma", tmp_path / "gamma")
    for case in ("mni152_train", "mni152_test"):
        lab = [sitk.GetArrayFromImage(sitk.ReadImage(str(d / "labelsTr" / f"{case}.nii.gz"))) for d in (source, shifted)]
        img = [sitk.ReadImage(str(d / "imagesTr" / f"{case}_0000.nii.gz")) for d in (source, shifted)]
        assert np.array_equal(lab[0], lab[1])
        assert img[0].GetOrigin() == img[1].GetOrigin() and img[0].GetSpacing() == img[1].GetSpacing()
        assert not np.array_equal(sitk.GetArrayFromImage(img[0]), sitk.GetArrayFromImage(img[1]))
    assert (shifted / "splits.json").read_text() == (source / "splits.json").read_text()
    assert "gamma 1.8" in (shifted / "dataset.json").read_text()
