"""Methods found by name: the five papers and the baselines, all ``Method`` subclasses."""

from __future__ import annotations

from typing import Any

from ..backbones.base import Backbone
from ..registry import Registry
from .base import Method, MethodConfig, config_from_dict

METHODS: Registry[type[Method]] = Registry("method", "samadapt.methods", Method)
"""Every method class by its ``name``; a module registers its class with ``@METHODS.register``."""


def build_method(name: str, backbone: Backbone | None, options: dict[str, Any] | None = None,
                 num_classes: int = 1) -> Method:
    """Build method ``name``; a one-class method given K > 1 classes runs one-vs-rest (one head per class)."""
    cls = METHODS.get(name)
    config = config_from_dict(cls.config_class, options)
    if cls.max_classes is not None and num_classes > cls.max_classes:
        from .one_vs_rest import OneVsRest

        return OneVsRest(cls, backbone, config, num_classes)
    return cls(backbone, config, num_classes)


def _import_builtins() -> None:
    """Import every module of this package so that each registers its methods (no list to keep in sync)."""
    import importlib
    import pkgutil

    for info in pkgutil.iter_modules(__path__):
        importlib.import_module(f"{__name__}.{info.name}")


_import_builtins()

__all__ = ["METHODS", "Method", "MethodConfig", "build_method"]
