"""``check_dataset`` collects every problem with its file; ``print_check`` renders the report; case writers."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import SimpleITK as sitk
from PIL import Image
from rich.console import Console

from samadapt.data.cases import Case, write_label_like, write_label_png
from samadapt.io_utils import atomic_path
from samadapt.data.check import check_dataset, print_check
from samadapt.errors import InputError


def write_case(root, cid, image, label, spacing=(1.0, 1.0, 2.0)):
    for arr, path in ((image, root / "imagesTr" / f"{cid}_0000.nii.gz"), (label, root / "labelsTr" / f"{cid}.nii.gz")):
        img = sitk.GetImageFromArray(arr)
        img.SetSpacing(spacing)
        sitk.WriteImage(img, str(path))


@pytest.fixture
def dataset(tmp_path):
    root = tmp_path / "ds"
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    image = np.random.default_rng(0).normal(size=(4, 10, 12)).astype(np.float32)
    label = np.zeros((4, 10, 12), np.uint8)
    label[1:3, 2:6, 2:6] = 1
    label[2, 7:9, 7:9] = 2
    write_case(root, "good", image, label)
    write_case(root, "aniso", image, label, spacing=(0.5, 0.5, 5.0))
    write_case(root, "empty", image, np.zeros_like(label))
    write_case(root, "badsize", image, label[:, :8])
    bad_values = label.copy()
    bad_values[0, 0, 0] = 9
    write_case(root, "badvalue", image, bad_values)
    (root / "dataset.json").write_text(json.dumps({"channel_names": {"0": "MRI"},
                                                   "labels": {"background": 0, "a": 1, "b": 2},
                                                   "numTraining": 5, "file_ending": ".nii.gz"}))
    return root


def test_check_reports_everything(dataset):
    report = check_dataset(dataset)
    assert not report["ok"] and report["format"] == "nnunet" and report["modality"] == "MR"
    assert report["num_cases"] == 5 and report["channels"] == 1
    assert report["slices"] == 12 and report["foreground_slices"] == 4  # good, aniso, empty only
    assert report["classes"]["a"] == {"id": 1, "voxels": 2 * 2 * 16, "cases": 2}
    assert report["classes"]["b"]["voxels"] == 8 and report["classes"]["background"]["cases"] == 3
    assert report["empty_masks"] == ["empty"]
    assert report["spacing"] == {"min": [2.0, 0.5, 0.5], "max": [5.0, 1.0, 1.0]}
    errors = {e["case"]: e for e in report["errors"]}
    assert set(errors) == {"badsize", "badvalue"}
    assert errors["badsize"]["file"].endswith("labelsTr/badsize.nii.gz") and "size" in errors["badsize"]["problem"]
    assert "[9]" in errors["badvalue"]["problem"]
    json.dumps(report)  # JSON-able for the manifest / --json output
    buffer = io.StringIO()
    print_check(report, Console(file=buffer, width=200))
    text = buffer.getvalue()
    assert "badsize" in text and "Classes" in text and "2 problem(s)" in text


def test_check_of_unopenable_dataset(tmp_path):
    report = check_dataset(tmp_path / "missing")
    assert not report["ok"] and report["errors"][0]["problem"] == "not found"


def test_write_label_like_sitk_path_and_2d(tmp_path):
    direction = (0.0, -1.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 1.0)
    case = Case("v", np.zeros((1, 3, 4, 5), np.float32), spacing=(2.5, 0.6, 0.7), origin=(1.0, 2.0, 3.0),
                direction=direction)
    label = np.zeros((3, 4, 5), np.uint8)
    label[1, 2, 3] = 4
    out = write_label_like(label, case, tmp_path / "v.nii.gz")
    img = sitk.ReadImage(str(out))
    np.testing.assert_allclose(img.GetSpacing(), (0.7, 0.6, 2.5), atol=1e-6)
    np.testing.assert_allclose(img.GetDirection(), direction, atol=1e-6)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(img), label)
    with pytest.raises(ValueError, match="does not match"):
        write_label_like(label[:2], case, tmp_path / "w.nii.gz")
    with pytest.raises(ValueError, match="as .png"):
        write_label_like(label, case, tmp_path / "v.png")
    flat = Case("p", np.zeros((3, 1, 4, 5), np.float32), is_2d=True, meta={"mask_scale": 255})
    two = np.zeros((4, 5), np.uint8)
    two[1:3, 1:3] = 1
    np.testing.assert_array_equal(np.asarray(Image.open(write_label_like(two, flat, tmp_path / "p.png"))), two * 255)
    many = two.astype(np.uint16) * 300
    write_label_png(many, tmp_path / "big.png")
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "big.png")), many)


def test_atomic_path_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "out.nii.gz"
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_bytes(b"half")
            raise RuntimeError("crash mid-write")
    assert list(tmp_path.iterdir()) == []
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_bytes(b"new but broken")
            raise RuntimeError("crash")
    assert target.read_bytes() == b"old"


def test_case_rejects_mismatched_label():
    with pytest.raises(InputError, match="mask size"):
        Case("x", np.zeros((1, 2, 3, 4), np.float32), np.zeros((2, 3, 5), np.uint8), source="/data/x.nii.gz")
