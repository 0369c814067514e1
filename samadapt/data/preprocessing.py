"""Intensity normalisation (per case) and the resize-longest-side + pad transform with its exact inverse.

Intensity (``normalize_intensity``: ``C x Z x Y x X`` -> float32 in [0, 1], per case, per channel):

- ``ct``: clip to a HU window (a named preset of ``WINDOWS`` or ``window_min``/``window_max``; default
  ``abdomen`` [-125, 275], the Synapse setting of SAMed/H-SAM) and scale to [0, 1].
- ``mr`` / ``percentile``: clip to the case's ``percentiles`` (default 0.5 and 99.5, over all voxels) and scale.
- ``natural``: 8-bit pictures divided by 255 (values already in [0, 1] are kept).
- ``none``: values are only clipped to [0, 1].
- ``auto`` picks by modality: CT -> ct, MR -> mr, natural -> natural, anything else -> percentile.

Geometry (``resize_pad``, routes chosen by :class:`Geometry`): a ``C x H x W`` slice is turned into 3 channels
(gray repeated; two channels become ``[c0, c1, mean]``) and brought to ``size x size`` (bilinear, antialiased):

- ``longest`` (SAM, the default): the longest side is resized to ``size`` (``new = int(old * size / max(H, W) +
  0.5)`` as in SAM) and the rest zero-padded at the bottom/right;
- ``stretch`` (ProMISe's release): ``H x W`` is resized directly to ``size x size``, no padding;
- ``stretch`` with ``via=v`` (DeSAM's release: slices stored at 256 x 256, resized to 1024 at the model input):
  first to ``v x v``, then to ``size x size``.

``restore`` crops the padding (none for ``stretch``) and resizes back to ``H x W`` (bilinear for probabilities,
nearest for labels). For labels resized up (``H, W <= size``, no ``via``), ``restore(resize_pad_label(y))``
returns ``y`` exactly.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import ConfigError

#: Named CT windows as (min HU, max HU) = (level - width / 2, level + width / 2).
WINDOWS: dict[str, tuple[float, float]] = {
    "abdomen": (-125.0, 275.0),  # L 75 / W 400 (Synapse, SAMed, H-SAM)
    "soft_tissue": (-160.0, 240.0),  # L 40 / W 400
    "liver": (-25.0, 175.0),  # L 75 / W 200
    "mediastinum": (-125.0, 225.0),  # L 50 / W 350
    "brain": (0.0, 80.0),  # L 40 / W 80
    "lung": (-1350.0, 150.0),  # L -600 / W 1500
    "bone": (-450.0, 1050.0),  # L 300 / W 1500
}

MODES = ("auto", "ct", "mr", "percentile", "natural", "none")


@dataclass(frozen=True)
class IntensityConfig:
    """How a case's intensities become [0, 1] (see the module docstring). Frozen so it can key caches."""

    mode: str = "auto"
    window: str | None = None
    window_min: float | None = None
    window_max: float | None = None
    percentiles: tuple[float, float] = (0.5, 99.5)

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ConfigError(f"intensity mode {self.mode!r} unknown; valid: {', '.join(MODES)}")
        if self.window is not None and self.window not in WINDOWS:
            raise ConfigError(f"CT window {self.window!r} unknown; presets: {', '.join(WINDOWS)}")
        if (self.window_min is None) != (self.window_max is None):
            raise ConfigError("give both window_min and window_max")
        if self.window_min is not None and self.window_max is not None and self.window_min >= self.window_max:
            raise ConfigError(f"window_min ({self.window_min}) must be below window_max ({self.window_max})")
        if self.window is not None and self.window_min is not None:
            raise ConfigError("give either a named window or window_min/window_max, not both")
        lo, hi = self.percentiles
        if not 0.0 <= lo < hi <= 100.0:
            raise ConfigError(f"percentiles must satisfy 0 <= low < high <= 100, got {self.percentiles}")
        object.__setattr__(self, "percentiles", (float(lo), float(hi)))

    def resolve(self, modality: str) -> str:
        """The concrete mode for a case of ``modality``."""
        if self.mode != "auto":
            return self.mode
        if self.window is not None or self.window_min is not None:
            return "ct"
        return {"CT": "ct", "MR": "mr", "natural": "natural"}.get(modality, "percentile")

    def ct_window(self) -> tuple[float, float]:
        if self.window_min is not None and self.window_max is not None:
            return float(self.window_min), float(self.window_max)
        return WINDOWS[self.window or "abdomen"]

    def to_dict(self) -> dict[str, Any]:
        return {"mode": self.mode, "window": self.window, "window_min": self.window_min,
                "window_max": self.window_max, "percentiles": list(self.percentiles)}

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> "IntensityConfig":
        d = dict(d or {})
        if "percentiles" in d:
            d["percentiles"] = tuple(d["percentiles"])
        return cls(**d)


def _scale(x: np.ndarray, lo: float, hi: float) -> np.ndarray:
    if hi <= lo:
        return np.zeros_like(x, dtype=np.float32)
    return np.clip((x - np.float32(lo)) / np.float32(hi - lo), 0.0, 1.0).astype(np.float32)


def normalize_intensity(image: np.ndarray, modality: str, cfg: IntensityConfig = IntensityConfig()) -> np.ndarray:
    """``image`` ``C x Z x Y x X`` (any real dtype) -> float32 ``C x Z x Y x X`` in [0, 1], per case and channel."""
    if image.ndim != 4:
        raise ValueError(f"expected C x Z x Y x X, got shape {image.shape}")
    x = np.asarray(image, dtype=np.float32)
    mode = cfg.resolve(modality)
    if mode == "ct":
        lo, hi = cfg.ct_window()
        return _scale(x, lo, hi)
    if mode in ("mr", "percentile"):
        out = np.empty_like(x)
        for c in range(x.shape[0]):
            lo, hi = np.percentile(x[c], cfg.percentiles)
            out[c] = _scale(x[c], float(lo), float(hi))
        return out
    if mode == "natural":
        if x.size and float(x.max()) > 1.0:
            x = x / 255.0
        return np.clip(x, 0.0, 1.0).astype(np.float32)
    return np.clip(x, 0.0, 1.0).astype(np.float32)  # "none"


class PadInfo(NamedTuple):
    """How a slice was resized/padded: original ``H x W``, resized ``new_h x new_w`` (top-left), square ``size``.

    A NamedTuple of ints, so ``torch.utils.data.default_collate`` turns a list of them into a PadInfo of tensors;
    :func:`pad_infos` turns either form back into a list.
    """

    orig_h: int
    orig_w: int
    new_h: int
    new_w: int
    size: int


RESIZES = ("longest", "stretch")


@dataclass(frozen=True)
class Geometry:
    """How a slice becomes the model's ``S x S`` input (see the module docstring). Frozen, like IntensityConfig.

    ``resize``: ``longest`` (SAM: longest side to S, zero-pad bottom/right) | ``stretch`` (directly to S x S, no
    padding; ProMISe's release). ``via``: with ``stretch``, first to ``via x via`` then to S (DeSAM's release: 256).
    """

    resize: str = "longest"
    via: int | None = None

    def __post_init__(self) -> None:
        if self.resize not in RESIZES:
            raise ConfigError(f"resize {self.resize!r} unknown; valid: {', '.join(RESIZES)}")
        if self.via is not None:
            if isinstance(self.via, bool) or not isinstance(self.via, int) or self.via < 1:
                raise ConfigError(f"resize via must be an integer >= 1 (or None), got {self.via!r}")
            if self.resize != "stretch":
                raise ConfigError(f"resize via={self.via} needs resize=stretch (got {self.resize!r}): the "
                                  "two-step route stretches to via x via, then to the input size")


LONGEST = Geometry()


def _steps(h: int, w: int, size: int, geometry: Geometry) -> list[tuple[int, int]]:
    """The sizes an ``h x w`` slice is resized to, in order (steps that change nothing left out)."""
    if geometry.resize == "stretch":
        targets = ([(geometry.via, geometry.via)] if geometry.via else []) + [(size, size)]
    else:
        info = pad_info_for(h, w, size)
        targets = [(info.new_h, info.new_w)]
    steps, current = [], (h, w)
    for step in targets:
        if step != current:
            steps.append(step)
            current = step
    return steps


def pad_info_for(h: int, w: int, size: int, geometry: Geometry = LONGEST) -> PadInfo:
    """The PadInfo that :func:`resize_pad` produces for an ``h x w`` slice (``stretch``: ``(h, w, S, S, S)``)."""
    if geometry.resize == "stretch":
        return PadInfo(h, w, size, size, size)
    scale = size / max(h, w)
    return PadInfo(h, w, min(size, int(h * scale + 0.5)), min(size, int(w * scale + 0.5)), size)


def pad_infos(pad: Any) -> list[PadInfo]:
    """Normalise a batch's ``pad`` entry (list of PadInfo, PadInfo of tensors/lists, or one PadInfo) to a list."""
    if isinstance(pad, PadInfo) and isinstance(pad.orig_h, int):
        return [pad]
    if isinstance(pad, (list, tuple)) and not isinstance(pad, PadInfo) and all(isinstance(p, tuple) for p in pad):
        return [PadInfo(*(int(v) for v in p)) for p in pad]
    columns = [torch.as_tensor(c).reshape(-1).tolist() for c in pad]
    return [PadInfo(*(int(v) for v in row)) for row in zip(*columns)]


def to_three_channels(image: Tensor) -> Tensor:
    """``C x H x W`` -> ``3 x H x W``: gray repeated, two channels as ``[c0, c1, mean]``, three kept."""
    c = image.shape[0]
    if c == 3:
        return image
    if c == 1:
        return image.expand(3, -1, -1)
    if c == 2:
        return torch.cat([image, image.mean(0, keepdim=True)], 0)
    raise ValueError(f"cannot map {c} channels to the 3 a SAM backbone takes; select at most 3 channels")


def resize_pad(image: Tensor, size: int, geometry: Geometry = LONGEST) -> tuple[Tensor, PadInfo]:
    """``C x H x W`` float -> (``3 x size x size`` float, PadInfo). Bilinear (antialiased) resize along the route
    of ``geometry``: longest side to ``size`` then zero-padding at the bottom/right, or ``stretch`` (no padding)."""
    if image.dim() != 3:
        raise ValueError(f"expected C x H x W, got {tuple(image.shape)}")
    h, w = image.shape[1], image.shape[2]
    info = pad_info_for(h, w, size, geometry)
    x = to_three_channels(image.float())
    for step in _steps(h, w, size, geometry):
        x = F.interpolate(x[None], size=step, mode="bilinear", align_corners=False, antialias=True)[0]
    out = x.new_zeros(3, size, size)
    out[:, : info.new_h, : info.new_w] = x
    return out, info


def resize_pad_label(label: Tensor, size: int, geometry: Geometry = LONGEST) -> Tensor:
    """``H x W`` int label -> ``size x size`` int64 (nearest, along the route of ``geometry``, padded with 0)."""
    if label.dim() != 2:
        raise ValueError(f"expected H x W, got {tuple(label.shape)}")
    h, w = label.shape
    info = pad_info_for(h, w, size, geometry)
    y = label.long()
    for step in _steps(h, w, size, geometry):
        y = F.interpolate(y[None, None].float(), size=step, mode="nearest-exact")[0, 0].long()
    out = torch.zeros(size, size, dtype=torch.long)
    out[: info.new_h, : info.new_w] = y
    return out


def restore(x: Tensor, info: PadInfo | Sequence[int], mode: str = "bilinear") -> Tensor:
    """Inverse of :func:`resize_pad`: ``K x size x size`` -> ``K x H x W`` (crop the padding, resize back).

    ``mode="bilinear"`` for probabilities/logits, ``"nearest"`` for integer labels (dtype kept).
    """
    info = PadInfo(*(int(v) for v in info))
    if x.dim() != 3 or x.shape[-1] != info.size or x.shape[-2] != info.size:
        raise ValueError(f"expected K x {info.size} x {info.size}, got {tuple(x.shape)}")
    crop = x[:, : info.new_h, : info.new_w]
    if (info.orig_h, info.orig_w) == (info.new_h, info.new_w):
        return crop.clone()
    if mode == "nearest":
        out = F.interpolate(crop[None].float(), size=(info.orig_h, info.orig_w), mode="nearest-exact")[0]
        return out.to(x.dtype)
    if mode != "bilinear":
        raise ValueError(f"mode must be 'bilinear' or 'nearest', got {mode!r}")
    return F.interpolate(crop[None].float(), size=(info.orig_h, info.orig_w), mode="bilinear",
                         align_corners=False, antialias=True)[0].to(x.dtype if x.is_floating_point() else torch.float32)
