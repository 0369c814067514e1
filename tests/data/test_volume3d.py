"""3D patches (samadapt.data.volume3d): crop/pad around the label, the release's intensity rule, sliding-window round
trip over whole volumes, and predictions written with the case's geometry."""

from __future__ import annotations

import numpy as np
import pytest

from samadapt.data.cases import Case
from samadapt.data.readers import load_case
from samadapt.data.volume3d import (extract, label_window, paste, predict_case_volume, release_intensity,
                                    sliding_window, training_patch, window_starts)


def test_training_patch_is_centred_on_the_label_and_pads_small_volumes():
    rng = np.random.default_rng(0)
    image = rng.normal(100, 30, (20, 40, 30)).astype(np.float32)
    label = np.zeros(image.shape, dtype=np.uint8)
    label[2:7, 30:38, 3:9] = 1  # near a corner: the 16^3 window leaves the volume on axis 0 and 2
    img, lab, starts = training_patch(image, label, 16, ct=False)
    assert img.shape == lab.shape == (16, 16, 16) and starts == (-4, 26, -2)
    assert lab.sum() == label.sum()  # the whole lesion is in the crop
    centre = np.argwhere(lab).mean(axis=0)
    assert np.all(np.abs(centre - 7.5) <= 1.0)
    assert np.all(img[:4] == img[0, 0, 0])  # padding (0 before normalisation) is one constant value
    big = np.zeros((64, 64, 64), np.uint8)
    assert label_window(big, 16) == (24, 24, 24)  # empty label: the volume centre


def test_release_intensity_clamps_ct_and_normalises_the_positive_voxels():
    x = np.array([-3000.0, -500.0, 0.0, 200.0, 400.0, 5000.0], dtype=np.float32)
    out = release_intensity(x, ct=True)
    inside = np.array([200.0, 400.0, 1000.0])
    assert np.allclose(out, (np.clip(x, -1000, 1000) - inside.mean()) / inside.std())
    assert np.array_equal(release_intensity(-np.ones(4), ct=False), -np.ones(4))  # no voxel > 0: unchanged


def test_extract_paste_round_trip_and_window_starts_cover_every_voxel():
    volume = np.arange(7 * 9 * 11, dtype=np.float32).reshape(7, 9, 11)
    for starts in [(0, 0, 0), (-3, 2, 5), (4, 6, 8)]:
        back = paste(extract(volume, starts, 6, fill=-1), starts, volume.shape)
        inside = paste(np.ones((6, 6, 6), np.float32), starts, volume.shape) > 0
        assert np.array_equal(back[inside], volume[inside]) and np.all(back[~inside] == 0)
    assert window_starts(10, 16, 0.5) == [0]
    assert window_starts(40, 16, 0.5) == [0, 8, 16, 24]
    with pytest.raises(ValueError):
        window_starts(40, 16, 1.0)


@pytest.mark.parametrize("shape", [(20, 33, 17), (10, 12, 8)])
def test_sliding_window_round_trip(shape):
    volume = np.random.default_rng(1).random(shape).astype(np.float32)
    seen = []
    out = sliding_window(volume, lambda p: seen.append(p.shape) or p, 16, overlap=0.5)
    assert np.allclose(out, volume)  # identity per patch, overlaps averaged: the volume back
    assert set(seen) == {(16, 16, 16)}
    assert np.array_equal(sliding_window(volume, lambda p: np.ones_like(p), 16), np.ones(shape, np.float32))
    with pytest.raises(ValueError, match="returned"):
        sliding_window(volume, lambda p: p[:8], 16)


def test_whole_volume_prediction_is_written_with_the_case_geometry(tmp_path):
    image = np.zeros((1, 24, 30, 20), np.float32)
    image[0, 5:15, 10:20, 4:12] = 500.0
    case = Case("ct1", image, spacing=(2.5, 0.8, 0.7), origin=(10.0, -5.0, 3.0), modality="CT")
    # normalised: the lesion (the only voxels > 0, all 500) becomes 0, the background -500
    path = predict_case_volume(case, lambda p: (p > -250).astype(np.float32), 16, out_path=tmp_path / "ct1.nii.gz")
    back = load_case(path)
    assert back.shape == case.shape
    assert np.allclose(back.spacing, case.spacing) and np.allclose(back.origin, case.origin)
    assert np.array_equal(np.asarray(back.image[0]) > 0, image[0] > 0)
