"""evaluate_folders: NIfTI and PNG round trips through files, spacing order, outputs, and bad input."""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from samadapt.evaluation.folders import evaluate_folders, print_summary, read_label_map
from samadapt.errors import InputError
from samadapt.evaluation.metrics import compute_metrics


def write(path: Path, arr: np.ndarray, spacing_xyz=None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    img = sitk.GetImageFromArray(arr)
    if spacing_xyz is not None:
        img.SetSpacing(spacing_xyz)
    sitk.WriteImage(img, str(path))
    return path


def boxes_3d():
    """6x6x6 boxes, the prediction shifted by 3 voxels along numpy axis 0 (z)."""
    gt = np.zeros((12, 10, 10), np.uint8)
    pred = np.zeros_like(gt)
    gt[2:8, 2:8, 2:8] = 1
    pred[5:11, 2:8, 2:8] = 1
    return pred, gt


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_nifti_round_trip_uses_gt_spacing_in_numpy_order(tmp_path):
    pred, gt = boxes_3d()
    spacing_xyz = (1.0, 1.0, 2.5)  # SimpleITK order: z is the last one
    write(tmp_path / "gt" / "case_a.nii.gz", gt, spacing_xyz)
    write(tmp_path / "pred" / "case_a.nii.gz", pred, spacing_xyz)
    # case b: class 1 perfect, class 2 predicted where the gt has none (HD95 undefined -> missing)
    gt_b = np.zeros((12, 10, 10), np.uint8)
    gt_b[3:9, 3:7, 3:7] = 1
    pred_b = gt_b.copy()
    pred_b[0:2, 0:2, 0:2] = 2
    gt_b[10, 8, 8] = 2  # class 2 exists somewhere in b's gt, far from the prediction
    write(tmp_path / "gt" / "case_b.nii", gt_b, spacing_xyz)  # stems pair across .nii and .nii.gz
    write(tmp_path / "pred" / "case_b.nii.gz", pred_b, spacing_xyz)
    # case c: class 2 predicted but absent from the gt
    gt_c = gt_b.copy()
    gt_c[gt_c == 2] = 0
    write(tmp_path / "gt" / "case_c.nii.gz", gt_c, spacing_xyz)
    write(tmp_path / "pred" / "case_c.nii.gz", pred_b, spacing_xyz)
    (tmp_path / "pred" / "notes.txt").write_text("ignored")

    out = tmp_path / "out"
    summary = evaluate_folders(tmp_path / "pred", tmp_path / "gt", out)

    assert summary["classes"] == [1, 2] and summary["num_cases"] == 3 and summary["units"] == "mm"
    rows = read_csv(out / "per_case.csv")
    assert [(r["case"], r["class"]) for r in rows] == [
        ("case_a", "1"), ("case_a", "2"), ("case_b", "1"), ("case_b", "2"), ("case_c", "1"), ("case_c", "2"),
    ]
    assert list(rows[0]) == ["case", "class", "dice", "iou", "hd95", "hd95_vox", "nsd", "assd"]
    a1 = rows[0]
    # 36 of the 152 rim voxels of each box are 3 voxels * 2.5 mm away from the other box: HD95 = 7.5 mm (3 voxels).
    # Had the spacing not been reversed to numpy order, the shift would be 3 * 1 mm.
    assert float(a1["hd95"]) == pytest.approx(7.5, abs=1e-4)
    assert float(a1["hd95_vox"]) == pytest.approx(3.0, abs=1e-4)
    assert float(a1["dice"]) == pytest.approx(0.5)
    expected = compute_metrics(pred, gt, [1, 2], (2.5, 1.0, 1.0))
    for m in ("dice", "iou", "hd95", "nsd", "assd"):
        assert float(a1[m]) == pytest.approx(expected[1][m], abs=1e-6)
    assert float(rows[1]["dice"]) == 1.0 and float(rows[1]["hd95"]) == 0.0  # class 2 absent from both in case a
    assert float(rows[3]["hd95"]) > 10  # case b class 2: two far-apart non-empty masks
    assert rows[5]["hd95"] == "nan" and float(rows[5]["dice"]) == 0.0 and float(rows[5]["nsd"]) == 0.0

    on_disk = json.loads((out / "summary.json").read_text())
    assert on_disk == summary
    assert on_disk["per_class"]["2"]["hd95"]["missing"] == 1 and on_disk["per_class"]["2"]["hd95"]["n"] == 2
    assert on_disk["per_class"]["1"]["dice"]["mean"] == pytest.approx((0.5 + 1 + 1) / 3)
    assert on_disk["foreground"]["dice"]["n"] == 3
    assert not list(out.glob(".*.tmp"))  # no temporary files left behind

    voxel = evaluate_folders(tmp_path / "pred", tmp_path / "gt", tmp_path / "out_vox", units="voxel")
    a1_vox = read_csv(tmp_path / "out_vox" / "per_case.csv")[0]
    assert float(a1_vox["hd95"]) == pytest.approx(3.0, abs=1e-4)
    assert voxel["units"] == "voxel"


def test_hd95_reported_in_mm_and_voxels_and_the_medpy_variant_labelled(tmp_path):
    z, y, x = np.ogrid[:14, :20, :22]
    gt = (((z - 6) / 4.0) ** 2 + ((y - 9) / 6.0) ** 2 + ((x - 10) / 7.0) ** 2 <= 1).astype(np.uint8)
    pred = (((z - 7) / 3.5) ** 2 + ((y - 10) / 7.0) ** 2 + ((x - 11) / 5.5) ** 2 <= 1).astype(np.uint8)
    write(tmp_path / "gt" / "c.nii.gz", gt, (0.7, 0.8, 3.0))  # numpy spacing (3.0, 0.8, 0.7)
    write(tmp_path / "pred" / "c.nii.gz", pred, (0.7, 0.8, 3.0))
    metrics = ("dice", "hd95", "hd95_vox", "hd95_medpy", "hd95_medpy_vox")
    summary = evaluate_folders(tmp_path / "pred", tmp_path / "gt", tmp_path / "out", metrics=metrics)
    row = read_csv(tmp_path / "out" / "per_case.csv")[0]
    assert list(row) == ["case", "class", *metrics]
    # MedPy 0.5.2 medpy.metric.binary.hd95 on these arrays (see tests/evaluation/test_metrics.py): 3.0806 mm, 2.2361 voxels
    assert float(row["hd95_medpy"]) == pytest.approx(3.0805843601, abs=1e-6)
    assert float(row["hd95_medpy_vox"]) == pytest.approx(2.2360679775, abs=1e-6)
    assert float(row["hd95"]) > float(row["hd95_medpy"]) + 0.05
    from rich.console import Console

    buf = io.StringIO()
    print_summary(summary, console=Console(file=buf, width=250, color_system=None))
    text = buf.getvalue()
    for header in ("HD95 (mm)", "HD95 (vox)", "HD95 MedPy (mm)", "HD95 MedPy (vox)"):
        assert header in text


def test_png_round_trip_infers_classes_and_ignores_print_resolution(tmp_path):
    rng = np.random.default_rng(3)
    cases = {}
    for name in ("x1", "x2"):
        gt = np.zeros((32, 40), np.uint8)
        gt[4:20, 5:25] = 1
        gt[22:30, 10:36] = 2
        pred = gt.copy()
        pred[rng.random(gt.shape) < 0.05] = 0  # a few holes
        pred[4:8, 5:25] = 0
        cases[name] = (pred, gt)
        # a pixel spacing stored in the PNG (pHYs) is a print resolution, not a voxel size: distances stay in pixels
        write(tmp_path / "gt" / f"{name}.png", gt, (0.5, 0.5))
        write(tmp_path / "pred" / f"{name}.png", pred)
    write(tmp_path / "pred" / "extra.png", cases["x1"][0])
    # a binary mask in the 2D-folder convention ({0, 255}) against a 0/1 prediction
    gt_bin = np.zeros((32, 40), np.uint8)
    gt_bin[8:24, 8:30] = 255
    pred_bin = (gt_bin == 255).astype(np.uint8)
    pred_bin[8:12, 8:30] = 0
    write(tmp_path / "gt" / "y.png", gt_bin)
    write(tmp_path / "pred" / "y.tif", pred_bin)
    cases["y"] = (pred_bin, (gt_bin == 255).astype(np.uint8))

    summary = evaluate_folders(tmp_path / "pred", tmp_path / "gt", tmp_path / "out", nsd_tolerance_mm=2.0)
    assert summary["classes"] == [1, 2]
    assert summary["raster_cases_without_spacing"] == 3
    assert summary["unmatched_predictions"] == ["extra"]
    # issue 24: an extra prediction file was ignored without a word
    assert summary["warnings"] == [f"1 prediction file(s) in {tmp_path / 'pred'} have no ground truth and are not "
                                   "scored: extra.png"]
    rows = read_csv(tmp_path / "out" / "per_case.csv")
    assert len(rows) == 6
    y1 = next(r for r in rows if r["case"] == "y" and r["class"] == "1")
    assert float(y1["dice"]) == pytest.approx(2 * 12 * 22 / (16 * 22 + 12 * 22))
    for r in rows:
        pred, gt = cases[r["case"]]
        exp = compute_metrics(pred, gt, [1, 2], None, nsd_tolerance_mm=2.0)[int(r["class"])]  # pixel units
        for m, v in exp.items():
            assert float(r[m]) == pytest.approx(v, abs=1e-6), (r["case"], r["class"], m)
    d1 = [compute_metrics(*cases[n], [1], None)[1]["dice"] for n in ("x1", "x2", "y")]
    assert summary["per_class"]["1"]["dice"]["mean"] == pytest.approx(np.mean(d1))
    assert summary["per_class"]["1"]["dice"]["std"] == pytest.approx(np.std(d1))

    buf = io.StringIO()
    from rich.console import Console

    print_summary(summary, console=Console(file=buf, width=200, color_system=None))
    text = buf.getvalue()
    assert "foreground" in text and "±" in text and "HD95 (mm)" in text and "pixels" in text


def test_missing_values_and_warnings_are_reported(tmp_path):
    gt = np.zeros((10, 10), np.uint8)
    gt[2:6, 2:6] = 1
    pred = np.zeros_like(gt)
    pred[9, 9] = 7  # a label the ground truth does not have
    write(tmp_path / "gt" / "a.nii.gz", gt, (0.8, 0.8))
    write(tmp_path / "pred" / "a.nii.gz", pred, (1.0, 1.0))
    summary = evaluate_folders(tmp_path / "pred", tmp_path / "gt", tmp_path / "out")
    assert summary["classes"] == [1]
    assert summary["per_class"]["1"]["hd95"] == {"mean": None, "std": None, "n": 0, "missing": 1}
    assert summary["per_class"]["1"]["dice"] == {"mean": 0.0, "std": 0.0, "n": 1, "missing": 0}
    assert len(summary["warnings"]) == 2
    assert "spacing" in summary["warnings"][0] and "labels [7]" in summary["warnings"][1]
    from rich.console import Console

    buf = io.StringIO()
    print_summary(summary, console=Console(file=buf, width=200, color_system=None))
    assert "n/a (1 missing)" in buf.getvalue() and "labels [7]" in buf.getvalue()


def test_size_mismatch_names_both_files_and_writes_nothing(tmp_path):
    write(tmp_path / "gt" / "a.nii.gz", np.ones((4, 8, 8), np.uint8))
    write(tmp_path / "pred" / "a.nii.gz", np.ones((4, 8, 9), np.uint8))
    out = tmp_path / "out"
    with pytest.raises(InputError) as err:
        evaluate_folders(tmp_path / "pred", tmp_path / "gt", out)
    msg = str(err.value)
    assert str(tmp_path / "pred" / "a.nii.gz") in msg and str(tmp_path / "gt" / "a.nii.gz") in msg
    assert "size" in msg
    assert not out.exists() or not any(out.iterdir())


def test_missing_prediction_names_the_gt_file(tmp_path):
    write(tmp_path / "gt" / "a.png", np.ones((8, 8), np.uint8))
    write(tmp_path / "gt" / "b.png", np.ones((8, 8), np.uint8))
    write(tmp_path / "pred" / "a.png", np.ones((8, 8), np.uint8))
    with pytest.raises(InputError, match=r"no prediction .* b\.png"):
        evaluate_folders(tmp_path / "pred", tmp_path / "gt", tmp_path / "out")
    assert not (tmp_path / "out" / "summary.json").exists()


def test_unreadable_and_wrong_files(tmp_path):
    write(tmp_path / "gt" / "a.nii.gz", np.ones((4, 8, 8), np.uint8))
    bad = tmp_path / "pred" / "a.nii.gz"
    bad.parent.mkdir()
    bad.write_bytes(b"this is not a NIfTI file at all" * 10)
    with pytest.raises(InputError, match="cannot read image") as err:
        evaluate_folders(tmp_path / "pred", tmp_path / "gt", tmp_path / "out")
    assert str(bad) in str(err.value)
    assert not (tmp_path / "out" / "per_case.csv").exists()
    # a real NIfTI cut short: the header reads, the voxel data does not
    whole = write(tmp_path / "whole.nii", np.ones((4, 8, 8), np.uint8)).read_bytes()
    truncated = tmp_path / "gt" / "a.nii"
    (tmp_path / "gt" / "a.nii.gz").unlink()
    truncated.write_bytes(whole[: len(whole) - 100])
    with pytest.raises(InputError, match="cannot read image") as err:
        evaluate_folders(tmp_path / "pred", tmp_path / "gt", tmp_path / "out")
    assert str(truncated) in str(err.value)

    rgb = np.zeros((6, 6, 3), np.uint8)
    rgb[..., 0] = 1
    img = sitk.GetImageFromArray(rgb, isVector=True)
    sitk.WriteImage(img, str(tmp_path / "rgb.png"))
    with pytest.raises(InputError, match="single-channel"):
        read_label_map(tmp_path / "rgb.png")
    with pytest.raises(InputError, match="not whole numbers"):
        read_label_map(write(tmp_path / "float.nii.gz", np.full((3, 4, 4), 0.5, np.float32)))
    with pytest.raises(InputError, match="not found"):
        read_label_map(tmp_path / "nothing.nii.gz")


def test_folder_problems(tmp_path):
    (tmp_path / "gt").mkdir()
    (tmp_path / "pred").mkdir()
    with pytest.raises(InputError, match="no ground-truth label maps"):
        evaluate_folders(tmp_path / "pred", tmp_path / "gt", tmp_path / "out")
    with pytest.raises(InputError, match="folder not found"):
        evaluate_folders(tmp_path / "nope", tmp_path / "gt", tmp_path / "out")
    write(tmp_path / "gt" / "a.png", np.ones((8, 8), np.uint8))
    write(tmp_path / "gt" / "a.nii.gz", np.ones((1, 8, 8), np.uint8))
    with pytest.raises(InputError, match="share the case name"):
        evaluate_folders(tmp_path / "pred", tmp_path / "gt", tmp_path / "out")
    (tmp_path / "gt" / "a.nii.gz").unlink()
    write(tmp_path / "gt" / "a.png", np.zeros((8, 8), np.uint8))
    write(tmp_path / "pred" / "a.png", np.zeros((8, 8), np.uint8))
    with pytest.raises(InputError, match="no foreground label"):
        evaluate_folders(tmp_path / "pred", tmp_path / "gt", tmp_path / "out")
    # with explicit classes an all-background pair is scored by the empty convention
    s = evaluate_folders(tmp_path / "pred", tmp_path / "gt", tmp_path / "out", classes=[1])
    assert s["per_class"]["1"]["dice"]["mean"] == 1.0 and s["per_class"]["1"]["hd95"]["mean"] == 0.0
    assert not math.isnan(s["foreground"]["nsd"]["mean"])


def test_cli_evaluate_metric_option(tmp_path):
    from typer.testing import CliRunner

    from samadapt.cli import app

    pred, gt = boxes_3d()
    write(tmp_path / "gt" / "a.nii.gz", gt, (1.0, 1.0, 2.5))
    write(tmp_path / "pred" / "a.nii.gz", pred, (1.0, 1.0, 2.5))
    runner = CliRunner()
    args = ["evaluate", str(tmp_path / "pred"), str(tmp_path / "gt"), "--out", str(tmp_path / "out")]
    result = runner.invoke(app, [*args, "--metric", "dice", "--metric", "hd95_medpy_vox"])
    assert result.exit_code == 0, result.output
    row = read_csv(tmp_path / "out" / "per_case.csv")[0]
    assert list(row) == ["case", "class", "dice", "hd95_medpy_vox"]
    assert float(row["hd95_medpy_vox"]) == pytest.approx(3.0, abs=1e-4)  # the 3-voxel shift, whatever the spacing
    bad = runner.invoke(app, [*args[:-1], str(tmp_path / "out2"), "--metric", "hd99"])
    assert bad.exit_code == 2 and "unknown metric" in bad.output and "Traceback" not in bad.output
    assert not (tmp_path / "out2" / "per_case.csv").exists()


def test_release_grid_protocol(tmp_path):
    """ProMISe's evaluation at 256 px: the prediction resized nearest, the ground truth bilinear then > 0, which
    dilates it (a one-pixel-wide object survives the 4x downsampling, and the border pixels count as foreground)."""
    from samadapt.evaluation.folders import to_release_grid

    gt = np.zeros((64, 64), np.uint8)
    gt[17:47, 17:47] = 1
    gt[2:62, 61] = 2  # a one-pixel line, between the columns that nearest downsampling keeps
    pred = np.zeros_like(gt)
    pred[17:47, 17:47] = 1
    p16, g16, spacing = to_release_grid(pred, gt, (0.5, 2.0), 16, tmp_path / "gt.png")
    nearest_gt = to_release_grid(gt, gt, (0.5, 2.0), 16, tmp_path / "gt.png")[0]
    assert p16.shape == g16.shape == (16, 16) and spacing == (2.0, 8.0)
    assert (p16 == 1).sum() == 7 * 7 == (nearest_gt == 1).sum()  # nearest: pixels 4i inside the square
    assert (g16 == 1).sum() == 8 * 8  # bilinear > 0: any of the two pixels around 4i + 1.5 inside
    assert (g16 == 2).any() and not (nearest_gt == 2).any()
    with pytest.raises(InputError, match="gt.png.*2D pictures"):
        to_release_grid(pred[None], gt[None], (1, 1, 1), 16, tmp_path / "gt.png")
    write(tmp_path / "gt" / "a.png", gt)
    write(tmp_path / "pred" / "a.png", pred)
    at_size = evaluate_folders(tmp_path / "pred", tmp_path / "gt", tmp_path / "o1", classes=[1], metrics=["dice"])
    on_grid = evaluate_folders(tmp_path / "pred", tmp_path / "gt", tmp_path / "o2", classes=[1], metrics=["dice"],
                               grid=16)
    assert at_size["classes"] == [1] and on_grid["grid"] == 16 and at_size["grid"] is None
    dice = float(read_csv(tmp_path / "o1" / "per_case.csv")[0]["dice"])
    dice_grid = float(read_csv(tmp_path / "o2" / "per_case.csv")[0]["dice"])
    assert dice == pytest.approx(1.0) and dice_grid < 0.95  # the dilated ground truth costs the exact prediction


def test_cli_evaluate_grid_option(tmp_path):
    from typer.testing import CliRunner

    from samadapt.cli import app

    pred, gt = boxes_3d()
    write(tmp_path / "gt" / "a.nii.gz", gt)
    write(tmp_path / "pred" / "a.nii.gz", pred)
    args = ["evaluate", str(tmp_path / "pred"), str(tmp_path / "gt"), "--out", str(tmp_path / "out"), "--grid", "256"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2 and "a.nii.gz" in result.output and "2D pictures" in result.output
    assert "Traceback" not in result.output and not (tmp_path / "out" / "per_case.csv").exists()
