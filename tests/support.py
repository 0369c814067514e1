"""Helpers shared by several test modules: small method settings, the CLI runner, DICOM and NIfTI phantoms."""

from __future__ import annotations

import locale
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch

# Small settings per method so that each builds, predicts and trains a step in well under a second on the tiny
# backbone.
SMALL = {
    "desam": {"channels": [32, 16, 8], "se_reduction": 4, "min_mask_region_area": 4, "points_per_side": 3},
    "hetersam": {"embed_dim": 16, "depths": [1, 1, 1, 1], "num_heads": [1, 2, 2, 4], "fusion_mlp_dim": 64,
                 "drop_path": 0.0},
    "msam": {"mea_pool_size": 8, "mea_mlp_ratio": 0.5, "train_iterations": 2, "infer_iterations": 3},
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


def make_method(name: str, backbone, num_classes: int = 1, seed: int = 0, **options):
    """Method ``name`` for ``num_classes`` classes on ``backbone`` with the ``SMALL`` settings (``options`` override
    them), built after ``torch.manual_seed(seed)`` so that its random initialisation is repeatable."""
    from samadapt.methods import build_method

    torch.manual_seed(seed)
    return build_method(name, backbone, {**SMALL.get(name, {}), **options}, num_classes)


def square_batch(squares=(), b: int = 2, size: int = 64, seed: int = 0, brighten: float = 0.0) -> dict:
    """A fixed batch in the batch convention: ``image`` B x 3 x S x S uniform noise (a generator seeded ``seed``),
    ``label`` B x S x S int64 holding class ``k`` in each square ``(k, y0, y1, x0, x1)`` on every image, or on image
    ``i`` only for ``(k, y0, y1, x0, x1, i)`` (later squares overwrite earlier ones); ``brighten`` is added to the
    image on the labelled pixels (then clamped to [0, 1]) so that the squares can be learnt."""
    import torch

    image = torch.rand(b, 3, size, size, generator=torch.Generator().manual_seed(seed))
    label = torch.zeros(b, size, size, dtype=torch.long)
    for k, y0, y1, x0, x1, *only in squares:
        images = slice(only[0], only[0] + 1) if only else slice(None)
        label[images, y0:y1, x0:x1] = k
    if brighten:
        image = (image + brighten * (label > 0)[:, None]).clamp(0, 1)
    return {"image": image, "label": label}


def discs_batch(b: int = 2, num_classes: int = 1, seed: int = 0, size: int = 64) -> dict:
    """``b`` items of ``synthetic.Discs`` collated into one batch (image B x 3 x S x S, label B x S x S, key)."""
    from samadapt.data.slices import collate
    from synthetic import Discs

    return collate(list(Discs(b, size, num_classes, seed)))


def image_items(n: int, seed: int, size: int = 64) -> list[dict]:
    """``n`` prediction items ``{"image": 3 x S x S}`` (the images of ``synthetic.Discs``)."""
    from synthetic import Discs

    return [{"image": d["image"]} for d in Discs(n, size=size, seed=seed)]


def perturb_lora(method) -> None:
    """Give every LoRA update a trained-looking non-zero B (B starts at zero), so that merging it changes weights."""
    import torch

    with torch.no_grad():
        for key, param in method.named_parameters():
            if "lora_B" in key:
                param.normal_(0.0, 0.05)


def predictor_probabilities(method, fast, items: list[dict], batch_size: int = 2):
    """``Predictor(method, fast=fast)`` probabilities of ``items`` stacked (N x (K + 1) x S x S), and the predictor."""
    import torch

    from samadapt.data.preprocessing import IntensityConfig
    from samadapt.engine.predict import Predictor

    predictor = Predictor(method, IntensityConfig(), batch_size=batch_size, fast=fast)
    return torch.stack(predictor.predict_probabilities(items)), predictor


def onnx_difference(method, path: Path, items: list[dict]) -> float:
    """Export ``method`` to ``path`` through its predictor, then max |ONNX Runtime - PyTorch| over the probabilities
    of ``items`` (batches of 3), checking that the ONNX predictor reads the data settings back."""
    import torch

    from samadapt.data.preprocessing import IntensityConfig
    from samadapt.engine.export import OnnxPredictor, export_predictor
    from samadapt.engine.predict import Predictor

    predictor = Predictor(method, IntensityConfig(mode="percentile", percentiles=(1.0, 99.0)), axis=0, batch_size=3)
    export_predictor(predictor, path)
    ours = torch.stack(predictor.predict_probabilities(items))
    onnx = OnnxPredictor(path, batch_size=3)
    theirs = torch.stack(onnx.predict_probabilities(items))
    assert onnx.intensity == predictor.intensity and onnx.input_size == predictor.input_size
    assert ours.shape == theirs.shape
    return (ours - theirs).abs().max().item()


def train_steps(method, batch: dict, optimizer, steps: int, seed: int | None = None) -> list[float]:
    """``steps`` optimiser steps of ``method.loss`` on one fixed ``batch``; the loss before each step. ``seed``
    reseeds torch before every forward (the same noise draws each step: changes come from the weights)."""
    losses = []
    for _ in range(steps):
        if seed is not None:
            torch.manual_seed(seed)
        loss = method.loss(method(batch), batch)["loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    return losses
