"""A tiny synthetic 3D nnU-Net folder for the 3D M-SAM engine and CLI tests: bright spheres in noise."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import SimpleITK as sitk

SPACING_XYZ, ORIGIN = (0.8, 0.9, 2.0), (1.5, -3.0, 7.0)
DIRECTION = (0.0, 1.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, -1.0)
#: ``--set`` items that keep a tiny-backbone 3D run to about a second per round.
FAST = ["train.val_every=2", "train.iterations=2", "train.batch_size=1", "model.infer_iterations=1",
        "train.device=cpu", "train.threads=1"]


def _write(arr: np.ndarray, path: Path) -> None:
    image = sitk.GetImageFromArray(arr)
    image.SetSpacing(SPACING_XYZ)
    image.SetOrigin(ORIGIN)
    image.SetDirection(DIRECTION)
    sitk.WriteImage(image, str(path))


def write_spheres(root: Path, n: int = 4, shape=(40, 40, 40), modality: str = "MR", seed: int = 0,
                  bad_label: bool = False) -> Path:
    """``n`` cases ``c<i>`` (image ``shape`` with one sphere of radius 7 at a random centre, label 1 there) with
    ``SPACING_XYZ``, ``ORIGIN``, ``DIRECTION``; ``bad_label``: the last label holds an undeclared value 5."""
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    rng = np.random.default_rng(seed)
    z, y, x = np.mgrid[:shape[0], :shape[1], :shape[2]]
    for i in range(n):
        c = rng.integers(12, np.array(shape) - 12)
        ball = ((z - c[0]) ** 2 + (y - c[1]) ** 2 + (x - c[2]) ** 2) < 49
        label = ball.astype(np.uint8) * (5 if bad_label and i == n - 1 else 1)
        _write((100 * ball + rng.normal(50, 10, shape)).astype(np.float32), root / "imagesTr" / f"c{i}_0000.nii.gz")
        _write(label, root / "labelsTr" / f"c{i}.nii.gz")
    (root / "dataset.json").write_text(json.dumps({"channel_names": {"0": modality},
                                                   "labels": {"background": 0, "lesion": 1}, "numTraining": n,
                                                   "file_ending": ".nii.gz"}))
    return root
