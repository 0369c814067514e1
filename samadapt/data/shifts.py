"""Simulated scanner shifts of a volume, for domain-generalisation targets (MONAI intensity transforms, fixed seed).

Each shift maps an intensity volume Z x Y x X (float32, any range) to a volume of the same shape and range; labels
are unchanged, so a shifted copy of a test set measures how much a model loses under the shift alone. The shifts
stand for what differs between scanners and protocols:

- ``bias``: a smooth multiplicative bias field (coil inhomogeneity), Legendre polynomials of degree 3 per axis.
- ``gamma``: a contrast change, gamma 1.8 on the intensities rescaled to [0, 1] (another sequence weighting).
- ``gibbs``: Gibbs ringing from k-space truncation (``alpha`` 0.5 of the spectrum kept along each axis).
- ``blur``: Gaussian blur, sigma 1.5 voxels in-plane (a softer reconstruction kernel).
- ``lowres``: in-plane resolution divided by 3 (area downsampling, then linear upsampling to the same grid).
- ``noise``: Rician noise at 5 % of the intensity range (a lower-field or faster acquisition).

``apply_shift(volume, name, seed)`` is deterministic for a given seed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from ..errors import ConfigError


@dataclass(frozen=True)
class Shift:
    """A named shift: what it simulates and the function (volume in [0, 1], numpy Generator) -> volume in [0, 1]."""

    description: str
    fn: Callable[[np.ndarray, np.random.Generator], np.ndarray]


def _bias(v: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    from monai.transforms import RandBiasField

    field = RandBiasField(degree=3, coeff_range=(0.2, 0.3), prob=1.0)
    field.set_random_state(int(rng.integers(2**31)))
    return np.asarray(field(v[None]))[0]


def _gamma(v: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    from monai.transforms import AdjustContrast

    return np.asarray(AdjustContrast(gamma=1.8)(v[None]))[0]


def _gibbs(v: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    from monai.transforms import GibbsNoise

    return np.asarray(GibbsNoise(alpha=0.5)(v[None]))[0]


def _blur(v: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    from monai.transforms import GaussianSmooth

    return np.asarray(GaussianSmooth(sigma=(0.0, 1.5, 1.5))(v[None]))[0]


def _lowres(v: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    x = torch.from_numpy(np.ascontiguousarray(v))[:, None]  # Z x 1 x Y x X: each axial slice
    low = torch.nn.functional.interpolate(x, scale_factor=1 / 3, mode="area")
    return torch.nn.functional.interpolate(low, size=v.shape[1:], mode="bilinear", align_corners=False)[:, 0].numpy()


def _noise(v: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    real = v + rng.normal(0.0, 0.05, v.shape)
    imag = rng.normal(0.0, 0.05, v.shape)
    return np.sqrt(real**2 + imag**2)


SHIFTS: dict[str, Shift] = {
    "bias": Shift("smooth multiplicative bias field (degree 3, coefficients 0.2-0.3)", _bias),
    "gamma": Shift("contrast change: gamma 1.8", _gamma),
    "gibbs": Shift("Gibbs ringing: k-space truncated to alpha 0.5", _gibbs),
    "blur": Shift("Gaussian blur, sigma 1.5 voxels in-plane", _blur),
    "lowres": Shift("in-plane resolution / 3 (area down, bilinear up)", _lowres),
    "noise": Shift("Rician noise, sigma 5 % of the range", _noise),
}


def apply_shift(volume: np.ndarray, name: str, seed: int = 0) -> np.ndarray:
    """``volume`` (Z x Y x X) under the shift ``name``, in the volume's own intensity range, float32.

    The volume is rescaled to [0, 1] (its min and max), shifted, clipped to [0, 1] and rescaled back."""
    if name not in SHIFTS:
        raise ConfigError(f"unknown shift {name!r}; available: {', '.join(SHIFTS)}")
    v = np.asarray(volume, dtype=np.float32)
    lo, hi = float(v.min()), float(v.max())
    unit = (v - lo) / max(hi - lo, 1e-12)
    out = SHIFTS[name].fn(unit, np.random.default_rng(seed))
    return (np.clip(out, 0.0, 1.0) * (hi - lo) + lo).astype(np.float32)
