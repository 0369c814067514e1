"""Volumetric patches for 3D models (3D M-SAM on SAM-Med3D): the release's training crops and sliding windows.

Arrays are D x H x W (a case's spatial axes, ``Case.image[c]``); a *window* is its start index per axis and the cube
side ``size`` (128 for SAM-Med3D). Starts may be negative or run past the end: what falls outside the volume reads
as ``fill`` (0, torchio's ``CropOrPad`` default) and is dropped when pasted back.

- ``label_window``: the window centred on the centre of the label's bounding box (torchio ``CropOrPad(size,
  mask_name="label")``, as M-SAM's release crops its training volumes); the volume's centre when the label is empty.
- ``release_intensity``: CT clamped to [-1000, 1000], then z-normalised with the mean and std of the voxels > 0
  (torchio ``ZNormalization(masking_method=lambda x: x > 0)``), as released (applied to the crop).
- ``training_patch``: clamp, crop/pad around the label, z-normalise -> (image, label) ``size^3`` patches.
- ``sliding_window``: probabilities of a whole volume from a per-patch predictor: windows of ``size`` with
  ``overlap`` (fraction of ``size``) covering every voxel, the last one flush with the end, overlaps averaged; with
  a ``label`` volume each window's label patch goes to the predictor too (simulated clicks).
"""

from __future__ import annotations

from typing import Callable

import numpy as np

CT_RANGE = (-1000.0, 1000.0)


def label_window(label: np.ndarray, size: int) -> tuple[int, int, int]:
    """Starts of the ``size``^3 window centred on the bounding box of ``label > 0`` (the volume centre if empty)."""
    fg = np.argwhere(np.asarray(label) > 0)
    if len(fg):
        centre = (fg.min(axis=0) + fg.max(axis=0) + 1) // 2
    else:
        centre = np.asarray(label.shape) // 2
    return tuple(int(c) - size // 2 for c in centre)


def extract(volume: np.ndarray, starts: tuple[int, ...], size: int, fill: float = 0.0) -> np.ndarray:
    """The ``size``^3 patch of ``volume`` at ``starts``; voxels outside the volume are ``fill``."""
    out = np.full((size,) * volume.ndim, fill, dtype=volume.dtype)
    src, dst = _overlap(volume.shape, starts, size)
    out[dst] = volume[src]
    return out


def paste(patch: np.ndarray, starts: tuple[int, ...], shape: tuple[int, ...], out: np.ndarray | None = None
          ) -> np.ndarray:
    """Write the part of ``patch`` that lies inside a volume of ``shape`` into ``out`` (zeros by default)."""
    out = np.zeros(shape, dtype=patch.dtype) if out is None else out
    src, dst = _overlap(shape, starts, patch.shape[0])
    out[src] = patch[dst]
    return out


def _overlap(shape: tuple[int, ...], starts: tuple[int, ...], size: int) -> tuple[tuple[slice, ...], ...]:
    """(volume slices, patch slices) of the part of the window inside the volume."""
    vol, pat = [], []
    for n, s in zip(shape, starts):
        lo, hi = max(s, 0), min(s + size, n)
        hi = max(hi, lo)
        vol.append(slice(lo, hi))
        pat.append(slice(lo - s, hi - s))
    return tuple(vol), tuple(pat)


def release_intensity(patch: np.ndarray, ct: bool) -> np.ndarray:
    """float32: clamp to ``CT_RANGE`` when ``ct``, then ``(x - mean) / std`` over the voxels > 0 (only the mean is
    removed when their std is 0; unchanged when there are none)."""
    x = np.asarray(patch, dtype=np.float32)
    if ct:
        x = np.clip(x, *CT_RANGE)
    inside = x[x > 0]
    if inside.size == 0:
        return x
    std = float(inside.std())
    return (x - float(inside.mean())) / (std if std > 0 else 1.0)


def training_patch(image: np.ndarray, label: np.ndarray, size: int, ct: bool
                   ) -> tuple[np.ndarray, np.ndarray, tuple[int, int, int]]:
    """(image patch float32, label patch, window starts): the release's clamp -> CropOrPad(label) -> ZNormalization."""
    x = np.clip(np.asarray(image, dtype=np.float32), *CT_RANGE) if ct else np.asarray(image, dtype=np.float32)
    starts = label_window(label, size)
    return release_intensity(extract(x, starts, size), ct=False), extract(np.asarray(label), starts, size), starts


def window_starts(length: int, size: int, overlap: float) -> list[int]:
    """Starts along one axis: step ``size * (1 - overlap)`` (at least 1), the last window ending at ``length``; one
    window at 0 when ``length <= size``."""
    if not 0 <= overlap < 1:
        raise ValueError(f"overlap must be in [0, 1), got {overlap}")
    if length <= size:
        return [0]
    step = max(1, int(size * (1 - overlap)))
    starts = list(range(0, length - size, step))
    return starts + [length - size]


def sliding_window(volume: np.ndarray, predict: Callable[..., np.ndarray], size: int,
                   overlap: float = 0.5, fill: float = 0.0, label: np.ndarray | None = None) -> np.ndarray:
    """Average of ``predict(patch)`` (a ``size``^3 array -> a ``size``^3 float array) over windows covering
    ``volume`` (D x H x W) -> float32 D x H x W; with ``label`` (D x H x W) ``predict(patch, label_patch)``, the
    label patch of the same window (0 outside the volume)."""
    if label is not None and label.shape != volume.shape:
        raise ValueError(f"sliding_window: label {label.shape} differs from the volume {volume.shape}")
    grids = [window_starts(n, size, overlap) for n in volume.shape]
    total = np.zeros(volume.shape, dtype=np.float32)
    count = np.zeros(volume.shape, dtype=np.float32)
    ones = np.ones((size,) * volume.ndim, dtype=np.float32)
    for starts in np.stack(np.meshgrid(*grids, indexing="ij"), -1).reshape(-1, volume.ndim):
        starts = tuple(int(s) for s in starts)
        patch = extract(volume, starts, size, fill)
        out = predict(patch) if label is None else predict(patch, extract(label, starts, size))
        out = np.asarray(out, dtype=np.float32)
        if out.shape != ones.shape:
            raise ValueError(f"sliding_window: predict returned {out.shape} for a {ones.shape} patch")
        src, dst = _overlap(volume.shape, starts, size)
        total[src] += out[dst]
        count[src] += 1.0
    return total / count


def predict_case_volume(case, predict: Callable[..., np.ndarray], size: int, overlap: float = 0.5,
                        out_path=None, label: np.ndarray | None = None):
    """A whole case through a 3D patch predictor: its first channel normalised once with ``release_intensity`` (CT
    clamped when ``case.modality`` is CT), ``sliding_window`` foreground probabilities (``label``, D x H x W: passed
    window by window to ``predict`` for simulated clicks), > 0.5 -> uint8 label map of the case's shape; written
    with the case's geometry (``write_label_like``) when ``out_path`` is given (returns the path), else returned."""
    from .cases import write_label_like

    volume = release_intensity(np.asarray(case.image[0]), ct=case.modality == "CT")
    label = (sliding_window(volume, predict, size, overlap, label=label) > 0.5).astype(np.uint8)
    return write_label_like(label, case, out_path) if out_path is not None else label
