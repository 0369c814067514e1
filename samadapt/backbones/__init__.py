"""SAM-family backbones found by name: ``build_backbone("litemedsam")``.

Each backbone is a ``Backbone`` subclass declaring its ``name`` and registered with ``@BACKBONES.register``; its
``build(checkpoint=None, ...)`` classmethod makes an instance (weights from ``checkpoint`` or the backbone's own).
"""

from __future__ import annotations

import inspect

import torch

from ..errors import ConfigError
from ..registry import Registry
from .base import Backbone, Features

BACKBONES: Registry[type[Backbone]] = Registry("backbone", "samadapt.backbones", Backbone)

NORMALIZATIONS = ("native", "unit")
"""``build_backbone(normalization=...)``: the backbone's own pixel scale/mean/std, or the [0, 1] images unchanged."""

UNIT_NORM_SUFFIX = "+unit-norm"


def _accepts_input_size(cls: type[Backbone]) -> bool:
    params = inspect.signature(cls.build).parameters.values()
    return any(p.name == "input_size" or p.kind is inspect.Parameter.VAR_KEYWORD for p in params)


def build_backbone(name: str = "litemedsam", checkpoint: str | None = None, *, input_size: int | None = None,
                   normalization: str = "native", **kwargs) -> Backbone:
    """Build a registered backbone; ``checkpoint`` overrides where its weights come from.

    ``input_size``: None keeps the backbone's native size. A backbone whose ``build`` takes ``input_size`` (SAM
    ViT-B/L/H: multiples of 16, position embeddings resampled) is built at that size; any other (``litemedsam`` at
    256, ``tiny`` at 64) accepts only its own fixed size and raises ConfigError otherwise.

    ``normalization``: ``"native"`` (the backbone's own preprocessing; SAM: 0-255 scale, ImageNet mean/std) or
    ``"unit"``: the [0, 1] images go to the encoder unchanged (scale 1, mean 0, std 1), as the H-SAM and SAMed
    releases feed them (``pixel_mean=0, pixel_std=1``). Where this changes the preprocessing, ``weights_id`` gains
    the suffix ``+unit-norm`` so that embedding caches and checkpoints never mix the two; LiteMedSAM already sees
    [0, 1] images, so ``"unit"`` changes nothing there.
    """
    if normalization not in NORMALIZATIONS:
        raise ConfigError(f"backbone normalization must be one of {', '.join(NORMALIZATIONS)}, got {normalization!r}")
    cls = BACKBONES.get(name)
    if input_size is not None and _accepts_input_size(cls):
        kwargs["input_size"] = int(input_size)
    backbone = cls.build(checkpoint=checkpoint, **kwargs)
    if input_size is not None and backbone.input_size != int(input_size):
        raise ConfigError(f"backbone {name} runs at {backbone.input_size} px only; backbone.input_size={input_size} "
                          f"is not supported (remove it or set {backbone.input_size})")
    if normalization == "unit":
        native = (float(backbone.pixel_scale), backbone.pixel_mean.flatten().tolist(),
                  backbone.pixel_std.flatten().tolist())
        if native != (1.0, [0.0] * 3, [1.0] * 3):
            backbone.pixel_scale = 1.0
            with torch.no_grad():
                backbone.pixel_mean.zero_()
                backbone.pixel_std.fill_(1.0)
            backbone.weights_id = f"{backbone.weights_id}{UNIT_NORM_SUFFIX}"
    return backbone


from . import litemedsam, mobilesam, sam, sam_med3d, tiny  # noqa: E402,F401  (register built-ins)

__all__ = ["BACKBONES", "NORMALIZATIONS", "Backbone", "Features", "build_backbone"]
