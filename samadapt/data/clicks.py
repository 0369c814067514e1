"""Simulated user clicks: one corrective click from the error between a predicted mask and the ground truth.

Every rule is a named *policy*; the error of a prediction ``pred`` against the truth ``target`` is its false-negative
region ``FN = target & ~pred`` and its false-positive region ``FP = pred & ~target``. A click is ``(x, y, label)``:
pixel column ``x`` and row ``y`` (the S x S frame the masks are in, as SAM's point prompts), ``label`` 1 (positive,
on a missed pixel) or 0 (negative, on a false one). A perfect prediction gets no click.

Policies (``POLICIES``):

- ``random``: a uniformly drawn error pixel, positive if it lies in FN, negative if in FP (M-SAM's release; its
  ``click_mode: random``). Draws from ``generator`` (a CPU ``torch.Generator``) when one is given.
- ``center``: the pixel deepest inside FN or inside FP taken as a whole (Euclidean distance to the region's
  complement and to the image border), whichever is deeper; ties go to FN (M-SAM's deterministic evaluation clicks,
  ``click_mode: center``).
- ``largest_region``: the deepest pixel of the largest 4-connected error component (FN and FP components compared
  by pixel count; ties go to FN) - the ProMISe prompting protocol's user.

Depth ties (several pixels equally deep) go to the first in row-major order.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch
from scipy import ndimage

from ..errors import ConfigError, InputError

POLICIES = ("random", "center", "largest_region")


class Click(NamedTuple):
    """One simulated click: pixel column ``x``, row ``y`` and ``label`` (1 positive, 0 negative)."""

    x: float
    y: float
    label: int


def _numpy(mask) -> np.ndarray:
    return (mask.detach().cpu().numpy() if isinstance(mask, torch.Tensor) else np.asarray(mask)).astype(bool)


def _deepest(mask: np.ndarray) -> tuple[int, int, float]:
    """(row, col, distance) of the pixel of ``mask`` farthest from its complement and from the image border."""
    dist = ndimage.distance_transform_edt(np.pad(mask, 1))[1:-1, 1:-1]
    flat = int(np.argmax(dist))
    return flat // mask.shape[1], flat % mask.shape[1], float(dist.flat[flat])


def _random(fn: np.ndarray, error: np.ndarray, generator: torch.Generator | None) -> tuple[int, int, bool]:
    weights = torch.from_numpy(error.reshape(-1)).float()
    idx = int(torch.multinomial(weights, 1, generator=generator))
    r, c = divmod(idx, error.shape[1])
    return r, c, bool(fn[r, c])


def _center(fn: np.ndarray, fp: np.ndarray) -> tuple[int, int, bool]:
    rn, cn, dn = _deepest(fn) if fn.any() else (0, 0, -1.0)
    rp, cp, dp = _deepest(fp) if fp.any() else (0, 0, -1.0)
    positive = dn >= dp
    r, c = (rn, cn) if positive else (rp, cp)
    return r, c, positive


def _largest_region(fn: np.ndarray, fp: np.ndarray) -> tuple[int, int, bool]:
    best = None  # (size, component mask, positive)
    for error, positive in ((fn, True), (fp, False)):
        components, n = ndimage.label(error)
        if n == 0:
            continue
        sizes = ndimage.sum(error, components, index=range(1, n + 1))
        k = int(np.argmax(sizes)) + 1
        if best is None or sizes[k - 1] > best[0]:
            best = (sizes[k - 1], components == k, positive)
    r, c, _ = _deepest(best[1])
    return r, c, best[2]


def check_policy(policy: str) -> None:
    """Raise ``ConfigError`` unless ``policy`` is one of ``POLICIES``."""
    if policy not in POLICIES:
        raise ConfigError(f"click policy must be one of {POLICIES}, got {policy!r}")


def next_click(pred, target, policy: str, generator: torch.Generator | None = None) -> Click | None:
    """The corrective click for one H x W mask ``pred`` (bool or 0/1, numpy or torch) against ``target`` (same
    shape) under ``policy`` (see the module docstring), or None when ``pred`` equals ``target``."""
    check_policy(policy)
    pred, target = _numpy(pred), _numpy(target)
    if pred.shape != target.shape or pred.ndim != 2:
        raise InputError("clicks", f"pred and target must both be H x W, got {pred.shape} and {target.shape}")
    fn, fp = target & ~pred, pred & ~target
    error = fn | fp
    if not error.any():
        return None
    if policy == "random":
        r, c, positive = _random(fn, error, generator)
    elif policy == "center":
        r, c, positive = _center(fn, fp)
    else:
        r, c, positive = _largest_region(fn, fp)
    return Click(float(c), float(r), 1 if positive else 0)


def batch_clicks(pred: torch.Tensor, target: torch.Tensor, policy: str,
                 generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One click per image of B x H x W masks, as SAM point prompts on ``pred``'s device: ``coords`` B x 1 x 2
    float (x, y) and ``labels`` B x 1 long; an image without error gets a padding point, label -1 at (0, 0).
    ``random`` draws the images' clicks in batch order from ``generator``."""
    check_policy(policy)
    if pred.shape != target.shape or pred.dim() != 3:
        raise InputError("clicks", f"pred and target must both be B x H x W, got {tuple(pred.shape)} and "
                         f"{tuple(target.shape)}")
    b = pred.shape[0]
    coords = torch.zeros(b, 1, 2, dtype=torch.float32, device=pred.device)
    labels = torch.full((b, 1), -1, dtype=torch.long, device=pred.device)
    for i in range(b):
        click = next_click(pred[i], target[i], policy, generator)
        if click is not None:
            coords[i, 0, 0], coords[i, 0, 1] = click.x, click.y
            labels[i, 0] = click.label
    return coords, labels
