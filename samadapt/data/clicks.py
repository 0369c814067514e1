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

Depth ties (several pixels equally deep) go to the first in row-major order. ``voxel_click`` /
``batch_voxel_clicks`` apply the same policies to D x H x W volumes (3D M-SAM).
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


def _deepest(mask: np.ndarray) -> tuple[tuple[int, ...], float]:
    """(index, distance) of the pixel (voxel) of ``mask`` farthest from its complement and from the image border."""
    dist = ndimage.distance_transform_edt(np.pad(mask, 1))[(slice(1, -1),) * mask.ndim]
    flat = int(np.argmax(dist))
    return tuple(int(i) for i in np.unravel_index(flat, mask.shape)), float(dist.flat[flat])


def _random(fn: np.ndarray, error: np.ndarray, generator: torch.Generator | None) -> tuple[tuple[int, ...], bool]:
    weights = torch.from_numpy(error.reshape(-1)).float()
    idx = tuple(int(i) for i in np.unravel_index(int(torch.multinomial(weights, 1, generator=generator)), error.shape))
    return idx, bool(fn[idx])


def _center(fn: np.ndarray, fp: np.ndarray) -> tuple[tuple[int, ...], bool]:
    origin = (0,) * fn.ndim
    n_idx, dn = _deepest(fn) if fn.any() else (origin, -1.0)
    p_idx, dp = _deepest(fp) if fp.any() else (origin, -1.0)
    positive = dn >= dp
    return (n_idx if positive else p_idx), positive


def _largest_region(fn: np.ndarray, fp: np.ndarray) -> tuple[tuple[int, ...], bool]:
    best = None  # (size, component mask, positive)
    for error, positive in ((fn, True), (fp, False)):
        components, n = ndimage.label(error)
        if n == 0:
            continue
        sizes = ndimage.sum(error, components, index=range(1, n + 1))
        k = int(np.argmax(sizes)) + 1
        if best is None or sizes[k - 1] > best[0]:
            best = (sizes[k - 1], components == k, positive)
    return _deepest(best[1])[0], best[2]


def check_policy(policy: str) -> None:
    """Raise ``ConfigError`` unless ``policy`` is one of ``POLICIES``."""
    if policy not in POLICIES:
        raise ConfigError(f"click policy must be one of {POLICIES}, got {policy!r}")


def next_click(pred, target, policy: str, generator: torch.Generator | None = None) -> Click | None:
    """The corrective click for one H x W mask ``pred`` (bool or 0/1, numpy or torch) against ``target`` (same
    shape) under ``policy`` (see the module docstring), or None when ``pred`` equals ``target``."""
    found = _error_click(pred, target, policy, generator, 2)
    if found is None:
        return None
    (r, c), positive = found
    return Click(float(c), float(r), 1 if positive else 0)


def _error_click(pred, target, policy: str, generator: torch.Generator | None,
                 ndim: int) -> tuple[tuple[int, ...], bool] | None:
    check_policy(policy)
    pred, target = _numpy(pred), _numpy(target)
    if pred.shape != target.shape or pred.ndim != ndim:
        axes = "H x W" if ndim == 2 else "D x H x W"
        raise InputError("clicks", f"pred and target must both be {axes}, got {pred.shape} and {target.shape}")
    fn, fp = target & ~pred, pred & ~target
    error = fn | fp
    if not error.any():
        return None
    if policy == "random":
        return _random(fn, error, generator)
    if policy == "center":
        return _center(fn, fp)
    return _largest_region(fn, fp)


def voxel_click(pred, target, policy: str, generator: torch.Generator | None = None
                ) -> tuple[tuple[int, int, int], int] | None:
    """The corrective click for one D x H x W mask ``pred`` against ``target`` (3D M-SAM): ((i0, i1, i2) voxel
    indices along the volume's axes 0, 1, 2, label 1 in FN / 0 in FP), or None when they are equal. The policies
    are those of the 2D clicks, over voxels (``center``: the deepest voxel by 3D Euclidean distance)."""
    found = _error_click(pred, target, policy, generator, 3)
    if found is None:
        return None
    return found[0], 1 if found[1] else 0


def batch_voxel_clicks(pred: torch.Tensor, target: torch.Tensor, policy: str,
                       generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One click per volume of B x D x H x W masks, as SAM-Med3D point prompts on ``pred``'s device: ``coords``
    B x 1 x 3 float (voxel indices along axes 0, 1, 2, the order SAM-Med3D's click code passes) and ``labels`` B x 1
    long; a volume without error gets a padding point, label -1 at the origin."""
    return _batched(pred, target, "B x D x H x W", lambda p, t: voxel_click(p, t, policy, generator))


def batch_clicks(pred: torch.Tensor, target: torch.Tensor, policy: str,
                 generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One click per image of B x H x W masks, as SAM point prompts on ``pred``'s device: ``coords`` B x 1 x 2
    float (x, y) and ``labels`` B x 1 long; an image without error gets a padding point, label -1 at (0, 0).
    ``random`` draws the images' clicks in batch order from ``generator``."""
    check_policy(policy)

    def one(p: torch.Tensor, t: torch.Tensor):
        click = next_click(p, t, policy, generator)
        return None if click is None else ((click.x, click.y), click.label)

    return _batched(pred, target, "B x H x W", one)


def _batched(pred: torch.Tensor, target: torch.Tensor, layout: str, one) -> tuple[torch.Tensor, torch.Tensor]:
    """``one(pred[i], target[i])`` -> (coordinates, label) or None for each item of a batch of masks laid out as
    ``layout``, stacked into ``coords`` B x 1 x C float and ``labels`` B x 1 long on ``pred``'s device; an item
    without error gets a padding point (label -1 at the origin)."""
    if pred.shape != target.shape or pred.dim() != len(layout.split(" x ")):
        raise InputError("clicks", f"pred and target must both be {layout}, got {tuple(pred.shape)} and "
                         f"{tuple(target.shape)}")
    b = pred.shape[0]
    coords = torch.zeros(b, 1, pred.dim() - 1, dtype=torch.float32, device=pred.device)
    labels = torch.full((b, 1), -1, dtype=torch.long, device=pred.device)
    for i in range(b):
        click = one(pred[i], target[i])
        if click is not None:
            coords[i, 0] = torch.tensor(click[0], dtype=torch.float32)
            labels[i, 0] = click[1]
    return coords, labels
