"""Baseline ``decoder``: prompt-free fine-tuning of SAM's mask decoder with learned prompt embeddings.

The encoder and prompt encoder stay frozen (so training runs from the embedding cache). The method owns a
trainable copy of the backbone's mask decoder plus, per foreground class, ``num_tokens`` learned sparse prompt
tokens and a learned dense prompt offset (initialised from the prompt encoder's ``no_mask_embed``). For K classes
the decoder runs once per class prompt and returns K logit maps (softmax against a zero background).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..backbones.base import Backbone
from . import METHODS
from ..layers.sam_decoder import decode_masks
from .base import Method, MethodConfig
from .losses import dice_ce_loss, with_background
from .options import option
from .prompting import encode_prompts, whole_image_boxes


@dataclass
class DecoderConfig(MethodConfig):
    num_tokens: int = option(2, ge=0)
    """Learned sparse prompt tokens per class."""
    learn_dense: bool = True
    """Learn a dense prompt map (h x w x 256) per class, added to ``no_mask_embed``."""
    init_from_box: bool = True
    """Start the first two sparse tokens at the prompt encoder's whole-image box embedding (the zero-shot
    ``box-prompt`` whole-box baseline), instead of small random tokens; training then starts from that baseline."""
    lambda_dice: float = option(1.0, ge=0)
    lambda_ce: float = option(1.0, ge=0)


@METHODS.register
class DecoderBaseline(Method):
    name = "decoder"
    config_class = DecoderConfig
    max_classes = None
    presets = {"cpu": "decoder_cpu", "tiny": "decoder_tiny"}
    benchmark_parts = ("latency", "cost")

    def __init__(self, backbone: Backbone, config: DecoderConfig, num_classes: int = 1):
        super().__init__(backbone, config, num_classes)
        backbone.freeze()
        self.mask_decoder = copy.deepcopy(backbone.mask_decoder).requires_grad_(True)
        dim = backbone.embed_dim
        h, w = backbone.embed_grid
        sparse = torch.randn(num_classes, config.num_tokens, dim) * 0.02
        if config.init_from_box:
            with torch.no_grad():
                box, _ = encode_prompts(backbone, boxes=whole_image_boxes(1, backbone.input_size, sparse.device))
            n = min(config.num_tokens, box.shape[1])
            sparse[:, :n] = box[0, :n]
        self.sparse = nn.Parameter(sparse)
        self.dense = nn.Parameter(torch.zeros(num_classes, dim, h, w)) if config.learn_dense else None

    def forward(self, batch: dict) -> dict[str, Tensor]:
        embedding = self.features(batch).embedding  # B x 256 x h x w
        b, k = embedding.shape[0], self.num_classes
        pe = self.backbone.prompt_encoder
        dense = pe.no_mask_embed.weight.reshape(1, -1, 1, 1).expand(k, -1, *embedding.shape[-2:])
        if self.dense is not None:
            dense = dense + self.dense
        # Run the decoder once per (image, class): batch index = image * K + class.
        src = embedding.repeat_interleave(k, dim=0)
        sparse = self.sparse.repeat(b, 1, 1)
        dense = dense.repeat(b, 1, 1, 1)
        logits, _ = decode_masks(self.mask_decoder, src, pe.get_dense_pe(), sparse, dense).select(False)
        class_logits = logits.reshape(b, k, *logits.shape[-2:])
        return {"logits": with_background(class_logits)}

    def loss(self, output: dict[str, Tensor], batch: dict) -> dict[str, Tensor]:
        loss = dice_ce_loss(output["logits"], batch["label"], self.config.lambda_dice, self.config.lambda_ce)
        return {"loss": loss}
