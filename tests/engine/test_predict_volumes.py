"""`samadapt predict` on a rotated anisotropic NIfTI volume and on a DICOM series: masks aligned with the input."""

import numpy as np
import SimpleITK as sitk

from support import run_cli
from support import write_dicom_series

ZERO_SHOT = ["--set", "backbone.name=tiny", "--set", "method.name=box-prompt", "--set", "method.options.mode=whole",
             "--device", "cpu"]


def _rotated_volume(path):
    arr = np.zeros((7, 40, 52), dtype=np.int16)
    arr[2:5, 10:30, 15:40] = 300
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing((0.7, 0.9, 3.0))
    img.SetOrigin((-12.5, 30.0, 7.25))
    c, s = np.cos(0.4), np.sin(0.4)
    img.SetDirection((c, -s, 0.0, s, c, 0.0, 0.0, 0.0, 1.0))
    sitk.WriteImage(img, str(path))
    return img


def test_predict_nifti_keeps_geometry(tmp_path):
    ref = _rotated_volume(tmp_path / "scan.nii.gz")
    run_cli("predict", str(tmp_path / "scan.nii.gz"), "--out", str(tmp_path / "pred"), *ZERO_SHOT)
    out = sitk.ReadImage(str(tmp_path / "pred" / "scan.nii.gz"))
    assert out.GetSize() == ref.GetSize()
    np.testing.assert_allclose(out.GetSpacing(), ref.GetSpacing(), atol=1e-5)
    np.testing.assert_allclose(out.GetOrigin(), ref.GetOrigin(), atol=1e-5)
    np.testing.assert_allclose(out.GetDirection(), ref.GetDirection(), atol=1e-5)
    assert set(np.unique(sitk.GetArrayFromImage(out))) <= {0, 1}


def test_predict_dicom_series_writes_aligned_nifti(tmp_path):
    vol = np.zeros((5, 48, 48), dtype=np.int16)
    vol[1:4, 10:30, 12:36] = 400
    write_dicom_series(tmp_path / "series", vol, "1.2.826.0.1.3680043.8.498.1")
    ref = sitk.ReadImage(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(tmp_path / "series")))
    run_cli("predict", str(tmp_path / "series"), "--out", str(tmp_path / "pred"), *ZERO_SHOT)
    written = [p for p in (tmp_path / "pred").iterdir() if p.name != "prediction.json"]
    assert len(written) == 1 and written[0].name.endswith(".nii.gz")
    assert (tmp_path / "pred" / "prediction.json").is_file()
    out = sitk.ReadImage(str(written[0]))
    assert out.GetSize() == ref.GetSize()
    np.testing.assert_allclose(out.GetSpacing(), ref.GetSpacing(), atol=1e-4)
    np.testing.assert_allclose(out.GetOrigin(), ref.GetOrigin(), atol=1e-4)
