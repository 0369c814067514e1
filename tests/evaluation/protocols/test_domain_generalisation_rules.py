"""DeSAM's evaluation rules in the DG protocol: the border zeroing and GT-slices-only scoring, on constructed cases."""

from __future__ import annotations

import numpy as np
import pytest

from samadapt.errors import ConfigError
from samadapt.evaluation.protocols.domain_generalisation import evaluate_domain_generalisation, gt_slices, zero_border
from samadapt.evaluation.metrics import compute_metrics


def test_border_zeroing_on_256_slices_removes_edge_false_positives_only():
    pred = np.zeros((3, 256, 256), np.uint8)
    pred[:, 100:150, 100:150] = 1  # the organ, inside
    pred[:, 0:20, :] = 1  # a false positive along the top edge
    pred[:, :, 240:] = 1  # and along the right edge
    out = zero_border(pred, axis=0, px=50)
    assert out[:, :50].sum() == 0 and out[:, 206:].sum() == 0 and out[:, :, :50].sum() == 0
    assert out[:, :, 206:].sum() == 0
    assert (out[:, 100:150, 100:150] == 1).all() and out.sum() == 3 * 50 * 50
    assert pred[:, 0:20].all()  # the input is not modified
    gt = np.zeros_like(pred)
    gt[:, 100:150, 100:150] = 1
    assert compute_metrics(out, gt, [1], (1.0, 1.0, 1.0))[1]["dice"] == pytest.approx(1.0)
    assert compute_metrics(pred, gt, [1], (1.0, 1.0, 1.0))[1]["dice"] < 0.5


def test_border_width_scales_with_the_slice_size_and_axis():
    pred = np.ones((512, 4, 128), np.uint8)  # slices normal to axis 1: in-plane 512 x 128
    out = zero_border(pred, axis=1, px=50)  # 100 px of 512, 25 px of 128
    assert out[:100].sum() == 0 and out[100:412, :, 25:103].all() and out[:, :, :25].sum() == 0
    assert out[412:].sum() == 0 and out[:, :, 103:].sum() == 0 and out.sum() == 312 * 4 * 78
    raw = zero_border(pred, axis=1, px=10, reference=None)
    assert raw[10:502, :, 10:118].all() and raw.sum() == 492 * 4 * 108
    assert zero_border(np.ones((128, 128)), axis=0, px=50).sum() == (128 - 50) ** 2  # 2D: one slice


def test_gt_slices_only_and_the_release_range():
    gt = np.zeros((10, 8, 8), np.uint8)
    gt[3:7, 2:6, 2:6] = 1  # GT on slices 3..6
    pred = np.zeros_like(gt)
    pred[3:7, 2:6, 2:6] = 1
    pred[0, :, :] = 1  # a false positive on a slice without GT
    p, g = gt_slices(pred, gt, axis=0)
    assert p.shape == g.shape == (4, 8, 8) and np.array_equal(p, g)
    assert compute_metrics(p, g, [1], (1.0, 1.0, 1.0))[1]["dice"] == pytest.approx(1.0)
    assert compute_metrics(pred, gt, [1], (1.0, 1.0, 1.0))[1]["dice"] < 0.7
    p, g = gt_slices(pred, gt, axis=0, release_range=True)  # z_min <= z < z_max: slice 6 left out
    assert g.shape == (3, 8, 8) and np.array_equal(g, gt[3:6])
    p, g = gt_slices(pred, np.moveaxis(gt, 0, 2), axis=2)  # another slice axis
    assert g.shape == (8, 8, 4)


def test_release_rules_are_checked_before_any_work(tmp_path):
    with pytest.raises(ConfigError, match="gt_slices_only"):
        evaluate_domain_generalisation(tmp_path / "none", [], release_gt_range=True)
    with pytest.raises(ConfigError, match="border_px"):
        evaluate_domain_generalisation(tmp_path / "none", [], border_px=-1)
