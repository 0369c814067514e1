"""Augmentation recipes chosen by name, built from MONAI dictionary transforms on one 2D training sample.

A recipe maps ``{"image": 3 x S x S float in [0, 1], "label": S x S int64}`` to the same shapes and dtypes (the
image is clipped back to [0, 1]). Spatial transforms move image and label together (bilinear / nearest, zero
padding). Recipes:

- ``none``: nothing (returns None from :func:`build_augment`).
- ``light``: horizontal and vertical flips (p = 0.5 each), intensity scale +-10 % and shift +-0.05 (p = 0.5).
- ``standard``: ``light`` plus a random affine (p = 0.5: rotation +-15 degrees, scaling 0.85-1.15) and Gaussian
  noise (p = 0.15, std 0.02).
- ``elastic``: ``standard`` plus a 2D elastic deformation (p = 0.3, control spacing S / 8, magnitude 1-2).

Augmentation changes the image, so augmented slices cannot use the embedding cache (see ``cache.py``). Each call
takes a seed so a sample's augmentation depends only on (dataset seed, epoch, index), whatever the worker.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from ..errors import ConfigError

RECIPES = ("none", "light", "standard", "elastic")


class Augment:
    """A named recipe; ``aug(sample, seed)`` returns a new augmented sample dict."""

    def __init__(self, name: str, size: int):
        if name not in RECIPES:
            raise ConfigError(f"augmentation recipe {name!r} unknown; valid: {', '.join(RECIPES)}")
        self.name = name
        self.size = size
        self._transform = _build(name, size)

    def __call__(self, sample: dict[str, Tensor], seed: int) -> dict[str, Tensor]:
        if self._transform is None:
            return sample
        has_label = "label" in sample and sample["label"] is not None
        data = {"image": sample["image"].float()}
        if has_label:
            data["label"] = sample["label"][None].float()
        self._transform.set_random_state(seed=int(seed) % (2**32))
        out = self._transform(data)
        result = dict(sample)
        result["image"] = _plain(out["image"]).clamp_(0.0, 1.0).contiguous()
        if has_label:
            result["label"] = _plain(out["label"])[0].round().long().contiguous()
        return result

    def __repr__(self) -> str:
        return f"Augment({self.name!r})"


def _plain(x) -> Tensor:
    return x.as_tensor() if hasattr(x, "as_tensor") else torch.as_tensor(x)


def _build(name: str, size: int) -> Callable | None:
    if name == "none":
        return None
    from monai.transforms import (Compose, Rand2DElasticd, RandAffined, RandFlipd, RandGaussianNoised,
                                  RandScaleIntensityd, RandShiftIntensityd)

    keys = ["image", "label"]
    steps: list = [
        RandFlipd(keys, prob=0.5, spatial_axis=0, allow_missing_keys=True),
        RandFlipd(keys, prob=0.5, spatial_axis=1, allow_missing_keys=True),
        RandScaleIntensityd("image", factors=0.1, prob=0.5),
        RandShiftIntensityd("image", offsets=0.05, prob=0.5),
    ]
    if name in ("standard", "elastic"):
        steps += [
            RandAffined(keys, prob=0.5, rotate_range=(0.2618,), scale_range=((-0.15, 0.15), (-0.15, 0.15)),
                        mode=("bilinear", "nearest"), padding_mode="zeros", allow_missing_keys=True),
            RandGaussianNoised("image", prob=0.15, mean=0.0, std=0.02),
        ]
    if name == "elastic":
        steps.append(Rand2DElasticd(keys, spacing=max(4, size // 8), magnitude_range=(1.0, 2.0), prob=0.3,
                                    mode=("bilinear", "nearest"), padding_mode="zeros", allow_missing_keys=True))
    return Compose(steps)


def build_augment(recipe: str | None, size: int) -> Augment | None:
    """The recipe named ``recipe`` for ``size x size`` samples, or None for ``none``/None."""
    if recipe is None or recipe == "none":
        return None
    return Augment(recipe, size)
