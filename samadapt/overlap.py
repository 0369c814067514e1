"""Dice from overlap counts: the one implementation that training validation, evaluation and the protocols share.

A leaf module (imports nothing from samadapt): the engine's validation sits below evaluation/ and needs the same
Dice. Inputs are numpy arrays or torch tensors of any shape (label maps or boolean masks); the result has the
input's kind. Empty convention: a class absent from both prediction and ground truth scores 1, absent from exactly one
scores 0.
"""

from __future__ import annotations

from typing import Iterable

import numpy as np
import torch

Array = np.ndarray | torch.Tensor


def mask_counts(pred: Array, gt: Array) -> Array:
    """(intersection, prediction size, ground-truth size) of two boolean masks of one shape: a vector of 3
    (float64)."""
    if isinstance(pred, torch.Tensor):
        return torch.stack([(pred & gt).sum(), pred.sum(), gt.sum()]).double()
    return np.array([np.count_nonzero(pred & gt), np.count_nonzero(pred), np.count_nonzero(gt)], dtype=np.float64)


def class_counts(pred: Array, gt: Array, classes: Iterable[int]) -> Array:
    """Per-class overlap counts of two label maps of one shape: K x 3 (see ``mask_counts``), K = len(classes)."""
    rows = [mask_counts(pred == k, gt == k) for k in classes]
    return torch.stack(rows) if isinstance(pred, torch.Tensor) else np.stack(rows)


def dice_from_counts(counts: Array) -> Array:
    """Dice of ``... x 3`` overlap counts (summed over as many items as wanted before): shape ``...``."""
    inter, ps, gs = counts[..., 0], counts[..., 1], counts[..., 2]
    denom = ps + gs
    if isinstance(counts, torch.Tensor):
        return torch.where(denom > 0, 2 * inter / denom.clamp_min(1), torch.ones_like(denom))
    return np.where(denom > 0, 2 * inter / np.maximum(denom, 1), 1.0)


def dice(pred: Array, gt: Array) -> float:
    """Dice of two binary masks (any non-zero value is foreground) of one shape."""
    return float(dice_from_counts(mask_counts(pred != 0, gt != 0)))


def foreground_dice(pred: Array, ref: Array, num_classes: int) -> float:
    """Dice of label maps ``pred`` against ``ref`` (one shape, any), per foreground class 1..num_classes-1 pooled
    over all their pixels, mean over the classes that either holds (1.0 when neither holds any foreground);
    ``num_classes`` >= 2."""
    counts = class_counts(pred, ref, range(1, num_classes))
    present = counts[:, 1] + counts[:, 2] > 0
    return float(dice_from_counts(counts[present]).mean()) if bool(present.any()) else 1.0
