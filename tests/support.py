"""Helpers shared by several test modules: small method settings, the CLI runner, DICOM and NIfTI phantoms."""

from __future__ import annotations

import locale
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import SimpleITK as sitk

# Small settings per method so that each builds and predicts in well under a second on the tiny backbone.
SMALL = {
    "desam": {"channels": [32, 16, 8], "se_reduction": 4, "min_mask_region_area": 4, "points_per_side": 3},
    "hetersam": {"embed_dim": 16, "depths": [1, 1, 1, 1], "num_heads": [1, 2, 2, 4], "fusion_mlp_dim": 64,
                 "drop_path": 0.0},
    "msam": {"mea_pool_size": 8, "mea_mlp_ratio": 0.5, "infer_iterations": 3},
    "promise": {"feature_channels": 16, "resnet_layers": [1, 1, 1, 1], "resnet_widths": [8, 16, 16, 16],
                "cross_dim": 32, "cross_heads": 2, "ips_hidden": 64, "num_points": 8},
    "unet": {"input_size": 64, "features": [8, 8, 16, 16, 32, 8]},
}


ENV = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1", "PYTHONIOENCODING": "utf-8"}


def run_cli(*args: str, check: bool = True, timeout: int = 300) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "samadapt.cli", *args], capture_output=True, encoding="utf-8",
                          env=ENV, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"samadapt {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def write_dicom_series(folder: Path, volume: np.ndarray, series_uid: str, spacing=(0.8, 0.8, 2.5)):
    """Write an int16 volume as a CT DICOM series (one file per slice) with SimpleITK."""
    saved = locale.setlocale(locale.LC_ALL)
    folder.mkdir(parents=True, exist_ok=True)
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    for z in range(volume.shape[0]):
        s = sitk.GetImageFromArray(volume[z])
        s.SetSpacing(spacing[:2])
        for tag, value in [("0008|0060", "CT"), ("0020|000e", series_uid), ("0020|000d", "1.2.826.0.1.3680043.2.1"),
                           ("0008|0016", "1.2.840.10008.5.1.4.1.1.2"), ("0008|0018", f"{series_uid}.{z + 1}"),
                           ("0020|0032", f"-10\\-20\\{z * spacing[2]}"), ("0020|0037", "1\\0\\0\\0\\1\\0"),
                           ("0020|0013", str(z + 1)), ("0018|0050", str(spacing[2]))]:
            s.SetMetaData(tag, value)
        writer.SetFileName(str(folder / f"{series_uid[-3:]}_{z:03d}.dcm"))
        writer.Execute(s)
    # GDCM's writer sets the C locale (LC_ALL=C), which turns Python's default text encoding into ASCII for the rest
    # of the process (a later test writing "±" then failed); put back the locale the process started with.
    locale.setlocale(locale.LC_ALL, saved)


DIRECTION = tuple(np.round(np.linalg.qr(np.array([[1.0, 0.3, 0.1], [-0.2, 1.0, 0.2], [0.1, -0.3, 1.0]]))[0], 12)
                  .reshape(-1))


def write_phantom(path: Path, shape=(12, 40, 48)) -> Path:
    """A bright ellipsoid in noise, with non-trivial spacing, origin and a rotated direction."""
    z, y, x = np.mgrid[:shape[0], :shape[1], :shape[2]]
    ball = ((x - shape[2] / 2) / 14) ** 2 + ((y - shape[1] / 2) / 11) ** 2 + ((z - shape[0] / 2) / 4) ** 2 < 1
    arr = (200 * ball + np.random.default_rng(0).normal(20, 5, shape)).astype(np.int16)
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing((0.8, 0.9, 2.5))
    img.SetOrigin((-12.0, 30.5, 7.25))
    img.SetDirection(DIRECTION)
    sitk.WriteImage(img, str(path))
    return path
