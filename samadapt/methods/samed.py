"""SAMed (Zhang & Liu 2023), the prompt-free SAM adaptation H-SAM builds on and compares against (METHODS.md 0, 2).

Shapes for a backbone with input ``S``, embedding grid ``h x w`` (``C = 256``), ``K`` foreground classes and
``T = K + 1`` class tokens (background first); SAM ViT-B at 512 px: S = 512, h = w = 32.

- Encoder: a copy of the backbone's image encoder with LoRA (rank 4, SAMed's default) on q and v of every attention
  block, base weights frozen, BatchNorm in eval mode (``samadapt.methods.lora_encoder``); training runs through it
  (no embedding cache; the frozen prefix is reused per slice while training without augmentation, ``prefix_cache``).
- Prompt encoder: prompt-free; its ``no_mask_embed`` (the only parameter that reaches the output) is trainable.
- Mask decoder: SAM's, trainable, in **SAM's block order** (self-attention -> token-to-image -> MLP ->
  image-to-token), with ``T`` mask tokens and hypernetwork MLPs re-initialised (SAMed's ``load_from`` skips them, as
  their count changes); its output is all ``T`` masks, ``low`` B x T x 4h x 4w logits. This is H-SAM's stage 1 in
  SAM's block order, without stage 2, the CMAttn and the feature noise. SAMed's IoU head is never used by its loss,
  so it is left out.
- Loss: ``0.2 CE + 0.8 Dice`` (SAMed's ``dice_param`` 0.8; softmax, background included, squared denominators) on
  the low-resolution logits against nearest-downsampled labels.
- Inference: the low-resolution logits bilinearly upsampled to ``S``, softmax over the T channels.

H-SAM's options for the same comparison: ``block_order="hsam"`` gives H-SAM's stage 1 alone ("H-SAM without stage
2"), ``lambda_ce=0.1, lambda_dice=0.9`` its loss weights.
"""

from __future__ import annotations

from dataclasses import dataclass

from monai.losses import DiceCELoss
from torch import Tensor

from ..backbones.base import Backbone
from ..layers.two_way import ORDERS
from . import METHODS
from .base import Method, resize_labels
from .hsam import HSAMStage1
from .lora_encoder import LoRAEncoderMixin, PrefixReuseConfig
from .options import option


@dataclass
class SAMedConfig(PrefixReuseConfig):
    lora_rank: int = option(4, ge=1)
    """LoRA rank on q and v of every encoder attention block (SAMed: 4; H-SAM: 5)."""
    lora_targets: list[str] | None = None
    """fnmatch patterns of the encoder's fused qkv Linear layers; None: the backbone's ``lora_targets``."""
    block_order: str = option("sam", choices=ORDERS)
    """sam (SAMed's decoder) | hsam (H-SAM's reordered stage-1 blocks: H-SAM with stage 2 disabled)."""
    lambda_ce: float = option(0.2, ge=0)
    lambda_dice: float = option(0.8, ge=0)


@METHODS.register
class SAMed(LoRAEncoderMixin, Method):
    """SAMed: ``forward`` returns ``logits`` B x T x 4h x 4w (low resolution); ``loss`` the DiceCE at that size."""

    name = "samed"
    config_class = SAMedConfig
    needs_encoder_grad = True
    max_classes = None
    presets = {"cpu": "samed_cpu", "paper": "samed_paper"}

    def __init__(self, backbone: Backbone, config: SAMedConfig, num_classes: int = 1):
        super().__init__(backbone, config, num_classes)
        self.setup_lora_encoder(backbone, config)
        self.decoder = HSAMStage1(backbone.mask_decoder, num_classes + 1, order=config.block_order)
        self.decoder.requires_grad_(True)
        self.loss_fn = DiceCELoss(softmax=True, to_onehot_y=True, include_background=True, squared_pred=True,
                                  batch=True, smooth_nr=1e-5, smooth_dr=1e-5, lambda_dice=config.lambda_dice,
                                  lambda_ce=config.lambda_ce)

    def forward(self, batch: dict) -> dict[str, Tensor]:
        embedding = self.features(batch).embedding
        pe = self.backbone.prompt_encoder.get_dense_pe().to(embedding.dtype)  # 1 x C x h x w
        dense = self.no_mask_embed.reshape(1, -1, 1, 1).to(embedding.dtype)
        return {"logits": self.decoder(embedding + dense, pe)["low"]}

    def loss(self, output: dict[str, Tensor], batch: dict) -> dict[str, Tensor]:
        logits = output["logits"].float()
        return {"loss": self.loss_fn(logits, resize_labels(batch["label"], logits.shape[-1])[:, None])}
