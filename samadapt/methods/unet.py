"""Baseline ``unet``: MONAI's BasicUNet trained from scratch on the same slices (no foundation model)."""

from __future__ import annotations

from dataclasses import dataclass

from monai.networks.nets import BasicUNet
from torch import Tensor

from . import METHODS
from .base import Method, MethodConfig
from .losses import dice_ce_loss
from .options import option


@dataclass
class UNetConfig(MethodConfig):
    features: tuple[int, ...] = (16, 32, 64, 128, 256, 16)
    """BasicUNet channel widths (5 levels + the final upsampling width)."""
    dropout: float = option(0.0, ge=0, le=1)
    input_size: int = option(0, ge=0)
    """Slice side; 0 = the backbone's input size, so the U-Net sees exactly the slices the SAM methods see."""


@METHODS.register
class UNetBaseline(Method):
    name = "unet"
    config_class = UNetConfig
    max_classes = None
    uses_backbone = False
    presets = {"cpu": "unet_cpu"}
    benchmark_parts = ("latency", "cost")

    def __init__(self, backbone, config: UNetConfig, num_classes: int = 1):
        super().__init__(None, config, num_classes)
        self._input_size = config.input_size or (backbone.input_size if backbone is not None else 256)
        out = 1 if num_classes == 1 else num_classes + 1
        self.net = BasicUNet(spatial_dims=2, in_channels=3, out_channels=out, features=tuple(config.features),
                             dropout=config.dropout)

    @property
    def input_size(self) -> int:
        return self._input_size

    def forward(self, batch: dict) -> dict[str, Tensor]:
        return {"logits": self.net(batch["image"] * 2.0 - 1.0)}

    def loss(self, output: dict[str, Tensor], batch: dict) -> dict[str, Tensor]:
        return {"loss": dice_ce_loss(output["logits"], batch["label"])}
