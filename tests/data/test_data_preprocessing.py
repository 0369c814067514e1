"""Intensity normalisation and the resize/pad transform with its inverse (round trips)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils.data import default_collate

from samadapt.data.preprocessing import (WINDOWS, IntensityConfig, PadInfo, normalize_intensity, pad_info_for,
                                         pad_infos, resize_pad, resize_pad_label, restore)
from samadapt.errors import ConfigError


def test_ct_window_presets_and_explicit():
    hu = np.array([-1000, -125, 75, 275, 2000], dtype=np.float32).reshape(1, 1, 1, 5)
    out = normalize_intensity(hu, "CT", IntensityConfig())  # auto -> ct, default abdomen [-125, 275]
    np.testing.assert_allclose(out.ravel(), [0, 0, 0.5, 1, 1], atol=1e-6)
    assert out.dtype == np.float32
    brain = normalize_intensity(hu, "CT", IntensityConfig(window="brain"))
    np.testing.assert_allclose(brain.ravel(), [0, 0, 75 / 80, 1, 1], atol=1e-6)
    explicit = normalize_intensity(hu, "MR", IntensityConfig(mode="ct", window_min=-1000, window_max=1000))
    np.testing.assert_allclose(explicit.ravel(), [0, 0.4375, 0.5375, 0.6375, 1], atol=1e-6)
    assert WINDOWS["abdomen"] == (-125.0, 275.0)


def test_mr_percentile_clipping_per_channel():
    rng = np.random.default_rng(0)
    x = np.stack([rng.normal(100, 10, (4, 20, 20)), rng.normal(-5, 1, (4, 20, 20))]).astype(np.float32)
    x[0, 0, 0, 0] = 1e6  # an outlier must not squash the range
    out = normalize_intensity(x, "MR", IntensityConfig())
    assert out.shape == x.shape and out.min() == 0.0 and out.max() == 1.0
    for c in range(2):
        lo, hi = np.percentile(x[c], (0.5, 99.5))
        np.testing.assert_allclose(out[c], np.clip((x[c] - lo) / (hi - lo), 0, 1), atol=1e-6)
    assert 0.3 < out[0].mean() < 0.7  # the outlier was clipped, not used as the maximum


def test_natural_and_none_modes_and_constant_image():
    x = np.array([0, 51, 255], np.float32).reshape(1, 1, 1, 3)
    np.testing.assert_allclose(normalize_intensity(x, "natural", IntensityConfig()).ravel(), [0, 0.2, 1])
    np.testing.assert_allclose(normalize_intensity(x / 255, "natural", IntensityConfig()).ravel(), [0, 0.2, 1])
    np.testing.assert_allclose(normalize_intensity(x, "other", IntensityConfig(mode="none")).ravel(), [0, 1, 1])
    flat = normalize_intensity(np.full((1, 2, 3, 3), 7.0, np.float32), "MR", IntensityConfig())
    assert np.all(flat == 0)


@pytest.mark.parametrize("kwargs", [dict(mode="fancy"), dict(window="kidney"), dict(window_min=3.0),
                                    dict(window_min=5.0, window_max=1.0), dict(percentiles=(99.0, 1.0)),
                                    dict(window="brain", window_min=0.0, window_max=1.0)])
def test_bad_intensity_configs(kwargs):
    with pytest.raises(ConfigError):
        IntensityConfig(**kwargs)


def test_intensity_config_roundtrip_dict():
    cfg = IntensityConfig(mode="ct", window="lung")
    assert IntensityConfig.from_dict(cfg.to_dict()) == cfg


def test_resize_pad_shapes_gray_to_rgb_and_zero_padding():
    image = torch.rand(1, 100, 50)
    out, info = resize_pad(image, 64)
    assert out.shape == (3, 64, 64) and info == PadInfo(100, 50, 64, 32, 64)
    assert torch.equal(out[0], out[1]) and torch.equal(out[1], out[2])
    assert out[:, :, 32:].abs().sum() == 0  # right padding
    two, _ = resize_pad(torch.rand(2, 10, 10), 10)
    assert torch.allclose(two[2], two[:2].mean(0))
    with pytest.raises(ValueError, match="channels"):
        resize_pad(torch.rand(4, 10, 10), 10)


def test_label_roundtrip_is_exact_when_upsampled():
    rng = np.random.default_rng(1)
    for h, w, s in [(37, 53, 64), (64, 64, 64), (20, 13, 64), (197, 233, 256)]:
        label = torch.from_numpy(rng.integers(0, 4, (h, w)))
        padded = resize_pad_label(label, s)
        assert padded.shape == (s, s) and padded.dtype == torch.long
        back = restore(padded[None], pad_info_for(h, w, s), mode="nearest")[0]
        assert back.shape == (h, w) and torch.equal(back, label)


def test_image_roundtrip_and_probability_restore():
    # a smooth image survives resize (down and up) + restore closely; a constant one exactly
    yy, xx = torch.meshgrid(torch.linspace(0, 1, 90), torch.linspace(0, 1, 120), indexing="ij")
    smooth = (torch.sin(3 * yy) * torch.cos(2 * xx))[None]
    for size in (64, 256):
        out, info = resize_pad(smooth, size)
        back = restore(out[:1], info)
        assert back.shape == (1, 90, 120)
        assert (back - smooth).abs().max() < 0.08
    probs = torch.full((2, 64, 64), 0.5)
    restored = restore(probs, pad_info_for(30, 50, 64))
    assert restored.shape == (2, 30, 50) and torch.allclose(restored, torch.full_like(restored, 0.5))


def test_label_downsampling_keeps_large_structures():
    label = torch.zeros(300, 200, dtype=torch.long)
    label[50:150, 40:120] = 2
    padded = resize_pad_label(label, 64)
    back = restore(padded[None], pad_info_for(300, 200, 64), mode="nearest")[0]
    agreement = (back == label).float().mean()
    assert back.shape == label.shape and agreement > 0.98


def test_pad_info_collates_both_ways():
    infos = [pad_info_for(30, 50, 64), pad_info_for(64, 10, 64)]
    collated = default_collate(infos)
    assert isinstance(collated, PadInfo) and torch.is_tensor(collated.orig_h)
    assert pad_infos(collated) == infos
    assert pad_infos(infos) == infos and pad_infos(infos[0]) == [infos[0]]
