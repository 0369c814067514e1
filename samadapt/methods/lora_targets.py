"""Which encoder layers a LoRA method adapts: its ``lora_targets`` option, else what the backbone declares."""

from __future__ import annotations

from typing import Sequence

from ..backbones.base import Backbone
from ..errors import ConfigError


def lora_targets(backbone: Backbone, override: Sequence[str] | None, method: str) -> list[str]:
    """fnmatch patterns of the image encoder's fused qkv ``nn.Linear`` layers: ``override`` (the method's
    ``lora_targets`` option) when given, else ``backbone.lora_targets``; ConfigError naming the backbone and the
    option to set when neither gives any."""
    targets = list(override or backbone.lora_targets)
    if not targets:
        raise ConfigError(f"{method}: backbone {backbone.name!r} declares no LoRA targets; set "
                          "method.options.lora_targets (fnmatch patterns of its image encoder's fused qkv Linear "
                          "layers)")
    return targets
