"""SAM-family backbones found by name: ``build_backbone("litemedsam")``."""

from __future__ import annotations

from typing import Callable

from ..registry import Registry
from .base import Backbone, Features

BACKBONES: Registry[Callable[..., Backbone]] = Registry("backbone", "samadapt.backbones")


def build_backbone(name: str = "litemedsam", checkpoint: str | None = None, **kwargs) -> Backbone:
    """Build a registered backbone; ``checkpoint`` overrides where its weights come from."""
    factory = BACKBONES.get(name)
    return factory(checkpoint=checkpoint, **kwargs)


from . import litemedsam, sam, tiny  # noqa: E402,F401  (register built-ins)

__all__ = ["BACKBONES", "Backbone", "Features", "build_backbone"]
