"""Metrics: hand-computed golden values, DeepMind reference values for NSD, the empty-mask conventions, spacing."""

from __future__ import annotations

import math

import numpy as np
import pytest

from samadapt.errors import InputError
from samadapt.evaluation.metrics import (ALL_METRICS, HD95_VARIANTS, METRICS, compute_metrics, dice, iou,
                              rows_from_result, summarize)

SQRT5 = math.sqrt(5.0)


def two_squares():
    """Two 6x6 squares, the prediction shifted by 3 voxels along axis 0 (rows 2..7 vs rows 5..10)."""
    gt = np.zeros((14, 10), np.uint8)
    pred = np.zeros_like(gt)
    gt[2:8, 2:8] = 1
    pred[5:11, 2:8] = 1
    return pred, gt


# Hand derivation for two_squares() (boundary voxels = the 20 voxels on each square's rim). Distances from the gt rim
# to the pred rim, in voxel steps (dr rows, dc columns):
#   top row (6 voxels): dr = 3;  bottom row: dc = 0,1,2,2,1,0 to pred's side columns;  each side column (rows 3..6):
#   dr = 2,1,0,0.  By symmetry pred -> gt gives the same multiset.
# spacing (2, 1): [6]*6 + [0,1,2,2,1,0] + [4,2,0,0]*2 mm -> P95 of 20 sorted values = 6, mean = 54/20 = 2.7.
# spacing (1, 2): [3]*6 + [0,2,2,2,2,0] + [2,1,0,0]*2 mm -> P95 = 3, mean = 32/20 = 1.6.
# voxels:         [3]*6 + [0,1,2,2,1,0] + [2,1,0,0]*2    -> P95 = 3, mean = 30/20 = 1.5.
# NSD (sub-voxel surface, DeepMind definition), spacing (2, 1): each square's contour on the voxel-corner lattice has
# 10 straight elements of length 1 (rows), 10 of length 2 (columns) and 4 corner diagonals of length sqrt(5)/2: total
# 30 + 2*sqrt(5). Within 1 mm of the other contour: the 2 bottom corners (0 mm), 2 bottom elements at 1 mm, 3 elements
# per side at 0 mm: 14 + sqrt(5). Within 2 mm add 2 bottom elements at 2 mm and one element per side at 2 mm:
# 20 + sqrt(5).


def test_golden_two_squares_mm():
    pred, gt = two_squares()
    r = compute_metrics(pred, gt, [1], (2.0, 1.0))[1]
    assert list(r) == list(METRICS)
    assert r["dice"] == pytest.approx(0.5)  # overlap 18 of 36 + 36
    assert r["iou"] == pytest.approx(18 / 54)
    assert r["hd95"] == pytest.approx(6.0, abs=1e-5)
    assert r["assd"] == pytest.approx(2.7, abs=1e-5)
    assert r["nsd"] == pytest.approx((14 + SQRT5) / (30 + 2 * SQRT5), abs=1e-6)
    r2 = compute_metrics(pred, gt, [1], (2.0, 1.0), nsd_tolerance_mm=2.0)[1]
    assert r2["nsd"] == pytest.approx((20 + SQRT5) / (30 + 2 * SQRT5), abs=1e-6)
    # symmetric in pred and gt
    r_swapped = compute_metrics(gt, pred, [1], (2.0, 1.0))[1]
    for m in METRICS:
        assert r_swapped[m] == pytest.approx(r[m], abs=1e-6)


def test_anisotropic_spacing_changes_hd95_as_expected():
    pred, gt = two_squares()
    along_2mm = compute_metrics(pred, gt, [1], (2.0, 1.0))[1]  # the 3-voxel shift is along the 2 mm axis: 6 mm
    along_1mm = compute_metrics(pred, gt, [1], (1.0, 2.0))[1]  # the shift is along the 1 mm axis: 3 mm
    assert along_2mm["hd95"] == pytest.approx(6.0, abs=1e-5)
    assert along_1mm["hd95"] == pytest.approx(3.0, abs=1e-5)
    assert along_1mm["assd"] == pytest.approx(1.6, abs=1e-5)
    # isotropic scaling scales every distance; Dice does not move
    iso = compute_metrics(pred, gt, [1], 0.5)[1]
    assert iso["hd95"] == pytest.approx(1.5, abs=1e-5)
    assert iso["assd"] == pytest.approx(0.75, abs=1e-5)
    assert iso["dice"] == along_2mm["dice"] == along_1mm["dice"]


def test_voxel_units_option():
    pred, gt = two_squares()
    none = compute_metrics(pred, gt, [1], None)[1]
    forced = compute_metrics(pred, gt, [1], (2.0, 1.0), units="voxel")[1]
    assert none == forced
    assert none["hd95"] == pytest.approx(3.0, abs=1e-5)
    assert none["assd"] == pytest.approx(1.5, abs=1e-5)
    with pytest.raises(InputError, match="units='mm' needs"):
        compute_metrics(pred, gt, [1], None, units="mm")
    with pytest.raises(InputError, match="units"):
        compute_metrics(pred, gt, [1], (1.0, 1.0), units="cm")


def test_hd95_ignores_a_rare_outlier_but_assd_sees_it():
    gt = np.zeros((40, 40), np.uint8)
    gt[5:15, 5:15] = 1
    pred = gt.copy()
    pred[35, 35] = 1  # one stray voxel: 1 of 37 pred boundary voxels
    r = compute_metrics(pred, gt, [1], (1.0, 1.0))[1]
    d = math.hypot(35 - 14, 35 - 14)  # to the nearest gt boundary voxel (14, 14)
    assert r["hd95"] == pytest.approx(0.0, abs=1e-6)  # P95 of 36 zeros and one outlier
    assert r["assd"] == pytest.approx(d / (37 + 36), abs=1e-5)
    assert r["dice"] == pytest.approx(200 / 201)


# ---- an independent brute-force reference for HD95 and ASSD (voxel-boundary definition) --------------------------


def _boundary(mask: np.ndarray) -> np.ndarray:
    padded = np.pad(mask, 1)
    core = tuple(slice(1, -1) for _ in range(mask.ndim))
    interior = mask.copy()
    for axis in range(mask.ndim):
        for shift in (1, -1):
            interior &= np.roll(padded, shift, axis=axis)[core]
    return mask & ~interior


def _reference(p: np.ndarray, g: np.ndarray, spacing) -> tuple[float, float]:
    bp = np.argwhere(_boundary(p)) * np.asarray(spacing)
    bg = np.argwhere(_boundary(g)) * np.asarray(spacing)
    dist = np.sqrt(((bp[:, None, :] - bg[None, :, :]) ** 2).sum(-1))
    d_pg, d_gp = dist.min(1), dist.min(0)
    return max(np.percentile(d_pg, 95), np.percentile(d_gp, 95)), float(np.concatenate([d_pg, d_gp]).mean())


def disc_and_ellipse():
    y, x = np.ogrid[:26, :28]
    gt = (y - 12) ** 2 + (x - 12) ** 2 <= 49
    pred = ((y - 13) / 6.0) ** 2 + ((x - 14) / 8.0) ** 2 <= 1
    return pred.astype(np.uint8), gt.astype(np.uint8)


def ball_and_box():
    z, y, x = np.ogrid[:16, :18, :20]
    gt = (z - 8) ** 2 + (y - 9) ** 2 + (x - 10) ** 2 <= 25
    pred = np.zeros((16, 18, 20), bool)
    pred[4:12, 5:14, 6:13] = True
    return pred.astype(np.uint8), gt.astype(np.uint8)


def test_hd95_assd_match_brute_force_reference_2d_and_3d():
    rng = np.random.default_rng(7)
    cases = [(*disc_and_ellipse(), (1.5, 0.8)), (*ball_and_box(), (2.5, 1.0, 0.7))]
    for _ in range(2):  # blobs touching the image border, anisotropic
        p = rng.random((12, 13, 9)) > 0.55
        g = rng.random((12, 13, 9)) > 0.55
        cases.append((p.astype(np.uint8), g.astype(np.uint8), (0.6, 1.7, 3.0)))
    for pred, gt, spacing in cases:
        r = compute_metrics(pred, gt, [1], spacing, metrics=("hd95", "assd"))[1]
        hd95, assd = _reference(pred.astype(bool), gt.astype(bool), spacing)
        assert r["hd95"] == pytest.approx(hd95, rel=1e-5)
        assert r["assd"] == pytest.approx(assd, rel=1e-5)


def test_nsd_matches_deepmind_reference_values():
    # Values from DeepMind's surface-distance (compute_surface_distances + compute_surface_dice_at_tolerance) on the
    # same shapes; MONAI's count-of-boundary-voxels variant gives different numbers here.
    pred, gt = disc_and_ellipse()
    assert compute_metrics(pred, gt, [1], (1.5, 0.8), 1.0, ("nsd",))[1]["nsd"] == pytest.approx(0.4756433824, abs=1e-5)
    assert compute_metrics(pred, gt, [1], (1.5, 0.8), 2.0, ("nsd",))[1]["nsd"] == pytest.approx(0.75, abs=1e-5)
    pred, gt = ball_and_box()
    spacing = (2.5, 1.0, 0.7)
    assert compute_metrics(pred, gt, [1], spacing, 1.0, ("nsd",))[1]["nsd"] == pytest.approx(0.8137652212, abs=1e-5)
    assert compute_metrics(pred, gt, [1], spacing, 1.5, ("nsd",))[1]["nsd"] == pytest.approx(0.9504024918, abs=1e-5)


def two_ellipsoids():
    """Two overlapping ellipsoids of different radii, offset by one voxel on every axis (CT-like spacing below)."""
    z, y, x = np.ogrid[:14, :20, :22]
    gt = ((z - 6) / 4.0) ** 2 + ((y - 9) / 6.0) ** 2 + ((x - 10) / 7.0) ** 2 <= 1
    pred = ((z - 7) / 3.5) ** 2 + ((y - 10) / 7.0) ** 2 + ((x - 11) / 5.5) ** 2 <= 1
    return pred.astype(np.uint8), gt.astype(np.uint8)


# Golden values of MedPy 0.5.2, computed once with ``medpy.metric.binary.hd95(pred, gt, voxelspacing=spacing,
# connectivity=1)`` (and without ``voxelspacing`` for voxels) on these exact arrays; MedPy is not a dependency.
MEDPY_HD95 = {  # case: (spacing, hd95 in mm, hd95 in voxels)
    "disc_and_ellipse": ((1.5, 0.8), 2.9066068868, 2.8284271247),
    "two_ellipsoids": ((3.0, 0.8, 0.7), 3.0805843601, 2.2360679775),
}


def test_hd95_medpy_variant_matches_medpy_and_differs_from_the_default():
    shapes = {"disc_and_ellipse": disc_and_ellipse(), "two_ellipsoids": two_ellipsoids()}
    for name, (spacing, medpy_mm, medpy_vox) in MEDPY_HD95.items():
        pred, gt = shapes[name]
        r = compute_metrics(pred, gt, [1], spacing, metrics=("hd95", *HD95_VARIANTS))[1]
        assert r["hd95_medpy"] == pytest.approx(medpy_mm, abs=1e-8)
        assert r["hd95_medpy_vox"] == pytest.approx(medpy_vox, abs=1e-8)
        # samadapt's default (larger directed P95) is the brute-force value, and it is not MedPy's pooled P95
        assert r["hd95"] == pytest.approx(_reference(pred.astype(bool), gt.astype(bool), spacing)[0], rel=1e-9)
        assert r["hd95"] > r["hd95_medpy"] + 0.05
        vox = compute_metrics(pred, gt, [1], None, metrics=("hd95", "hd95_medpy"))[1]
        assert r["hd95_vox"] == pytest.approx(vox["hd95"], abs=1e-12)
        assert r["hd95_medpy_vox"] == pytest.approx(vox["hd95_medpy"], abs=1e-12)
    # hand check on two_squares (voxels: [3]*6 + [0,1,2,2,1,0] + [2,1,0,0]*2 per direction, both directions equal)
    pred, gt = two_squares()
    r = compute_metrics(pred, gt, [1], (2.0, 1.0), metrics=ALL_METRICS)[1]
    assert list(r) == list(ALL_METRICS)
    assert (r["hd95"], r["hd95_medpy"], r["hd95_vox"], r["hd95_medpy_vox"]) == pytest.approx((6.0, 6.0, 3.0, 3.0))


def test_hd95_variants_follow_the_empty_conventions_and_voxel_twins_ignore_units():
    empty = np.zeros((8, 9), np.uint8)
    some = empty.copy()
    some[2:5, 3:6] = 1
    assert compute_metrics(empty, empty, [1], (1.0, 2.0), metrics=HD95_VARIANTS)[1] == dict.fromkeys(HD95_VARIANTS, 0.0)
    one = compute_metrics(some, empty, [1], (1.0, 2.0), metrics=HD95_VARIANTS)[1]
    assert all(math.isnan(one[m]) for m in HD95_VARIANTS)
    pred, gt = disc_and_ellipse()
    mm = compute_metrics(pred, gt, [1], (1.5, 0.8), metrics=("hd95_vox",))[1]
    forced = compute_metrics(pred, gt, [1], (1.5, 0.8), metrics=("hd95_vox",), units="voxel")[1]
    brute_vox = _reference(pred.astype(bool), gt.astype(bool), (1.0, 1.0))[0]
    assert mm == forced == {"hd95_vox": pytest.approx(brute_vox, rel=1e-9)}
    assert brute_vox != pytest.approx(MEDPY_HD95["disc_and_ellipse"][2], abs=1e-3)  # 2.871 vs MedPy's 2.828
    with pytest.raises(InputError, match="unknown metric"):
        compute_metrics(pred, gt, [1], (1.5, 0.8), metrics=("hd99",))


# ---- empty masks ---------------------------------------------------------------------------------------------------


def test_empty_conventions():
    empty = np.zeros((8, 9), np.uint8)
    some = empty.copy()
    some[2:5, 3:6] = 1
    both = compute_metrics(empty, empty, [1], (1.0, 2.0))[1]
    assert both == {"dice": 1.0, "iou": 1.0, "hd95": 0.0, "nsd": 1.0, "assd": 0.0}
    for pred, gt in ((some, empty), (empty, some)):
        one = compute_metrics(pred, gt, [1], (1.0, 2.0))[1]
        assert (one["dice"], one["iou"], one["nsd"]) == (0.0, 0.0, 0.0)
        assert math.isnan(one["hd95"]) and math.isnan(one["assd"])
    assert dice(empty, empty) == 1.0 and iou(empty, empty) == 1.0
    assert dice(some, empty) == 0.0 and iou(empty, some) == 0.0


def test_multiclass_3d_with_absent_class_and_subset_of_metrics():
    gt = np.zeros((6, 10, 10), np.int16)
    gt[1:5, 1:5, 1:5] = 1
    gt[1:5, 6:9, 6:9] = 2
    pred = gt.copy()
    pred[1:5, 6:9, 6:9] = 0  # class 2 missed entirely
    pred[0, 0, 0] = 4  # a false positive of a class absent from the gt
    r = compute_metrics(pred, gt, [1, 2, 3, 4], (3.0, 1.0, 1.0), metrics=("dice", "hd95"))
    assert set(r) == {1, 2, 3, 4} and all(list(v) == ["dice", "hd95"] for v in r.values())
    assert r[1] == {"dice": 1.0, "hd95": 0.0}
    assert r[2]["dice"] == 0.0 and math.isnan(r[2]["hd95"])
    assert r[3] == {"dice": 1.0, "hd95": 0.0}  # absent in both
    assert r[4]["dice"] == 0.0 and math.isnan(r[4]["hd95"])  # Dice 0, not SAMed's 1


def test_singleton_axis_is_dropped():
    pred, gt = two_squares()
    flat = compute_metrics(pred, gt, [1], (2.0, 1.0))
    stacked = compute_metrics(pred[None], gt[None], [1], (5.0, 2.0, 1.0))
    for m in METRICS:
        assert stacked[1][m] == pytest.approx(flat[1][m], abs=1e-6)


def test_bad_inputs():
    pred, gt = two_squares()
    with pytest.raises(InputError, match="shapes differ"):
        compute_metrics(pred[:, :9], gt, [1], (1.0, 1.0))
    with pytest.raises(InputError, match="spacing"):
        compute_metrics(pred, gt, [1], (1.0, 1.0, 1.0))
    with pytest.raises(InputError, match="spacing"):
        compute_metrics(pred, gt, [1], (1.0, 0.0))
    with pytest.raises(InputError, match="unknown metric"):
        compute_metrics(pred, gt, [1], None, metrics=("dice", "hd100"))
    with pytest.raises(InputError, match="integer label map"):
        compute_metrics(pred + 0.5, gt, [1], None)
    with pytest.raises(InputError, match="2D or 3D"):
        compute_metrics(np.zeros(5, int), np.zeros(5, int), [1], None)
    with pytest.raises(InputError, match="shapes differ"):
        dice(pred[:3], gt)
    # whole-number floats are accepted as labels
    assert compute_metrics(pred.astype(np.float32), gt, [1], None, metrics=("dice",))[1]["dice"] == 0.5


# ---- summary -------------------------------------------------------------------------------------------------------


def test_summarize_is_nan_aware_and_counts_missing():
    rows = rows_from_result("a", {1: {"dice": 0.8, "hd95": 2.0}, 2: {"dice": 0.0, "hd95": math.nan}})
    rows += rows_from_result("b", {1: {"dice": 0.6, "hd95": 4.0}, 2: {"dice": 1.0, "hd95": 0.0}})
    rows += rows_from_result("c", {1: {"dice": 0.0, "hd95": math.nan}, 2: {"dice": 0.0, "hd95": math.nan}})
    s = summarize(rows)
    assert s["metrics"] == ["dice", "hd95"] and s["classes"] == [1, 2] and s["num_cases"] == 3
    c1 = s["per_class"]["1"]
    assert c1["dice"] == {
        "mean": pytest.approx(1.4 / 3), "std": pytest.approx(np.std([0.8, 0.6, 0.0])), "n": 3, "missing": 0
    }
    assert c1["hd95"] == {"mean": 3.0, "std": 1.0, "n": 2, "missing": 1}  # the NaN is left out, not counted as 0
    assert s["per_class"]["2"]["hd95"] == {"mean": 0.0, "std": 0.0, "n": 1, "missing": 2}
    # foreground: per-case mean over classes (a: 2.0, b: 2.0, c: none), then over cases
    fg = s["foreground"]
    assert fg["hd95"] == {"mean": 2.0, "std": 0.0, "n": 2, "missing": 1}
    assert fg["dice"]["mean"] == pytest.approx(np.mean([0.4, 0.8, 0.0]))
    all_missing = summarize(rows_from_result("x", {1: {"hd95": math.nan}}))
    only = all_missing["per_class"]["1"]["hd95"]
    assert math.isnan(only["mean"]) and only["missing"] == 1 and only["n"] == 0
