"""Baseline ``box-prompt``: the zero-shot backbone prompted with a box, no training.

User prompts in the batch (``boxes``, and/or ``points`` with ``point_labels``) replace the mode's box.
Modes: ``gt`` uses the tight box around the ground truth of each slice (an oracle upper bound: it needs labels at
prediction time and predicts empty where the ground truth is empty); ``whole`` uses the whole-image box on every
slice (the honest automatic baseline). For K classes in ``gt`` mode, each class gets its own box and the label map
gives a pixel to the class with the largest logit. Where the boxes nearly coincide (nested tissues) the decoder can
return the same mask for each and the label map gives it all to one class; ``benchmarks/one_vs_rest_probe.py``
scores each class's own mask.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..errors import ConfigError, InputError
from ..layers.sam_decoder import decode_masks
from . import METHODS
from .base import Method, MethodConfig, logits_to_probabilities, upsample_to
from .options import option
from .prompting import encode_prompts, label_boxes, whole_image_boxes


@dataclass
class BoxPromptConfig(MethodConfig):
    mode: str = option("whole", choices=("gt", "whole"))
    """``gt`` (oracle box from the ground truth) or ``whole`` (whole-image box)."""


@METHODS.register
class BoxPrompt(Method):
    name = "box-prompt"
    config_class = BoxPromptConfig
    max_classes = None
    trainable = False
    promptable = True
    prompt_kinds = ("points", "boxes")
    presets = {"cpu": "box_prompt_whole", "oracle": "box_prompt_gt"}
    benchmark_parts = ("latency",)

    def __init__(self, backbone, config: BoxPromptConfig, num_classes: int = 1):
        super().__init__(backbone, config, num_classes)
        if config.mode == "whole" and num_classes > 1:
            raise ConfigError("box-prompt mode 'whole' gives one mask; use mode 'gt' for several classes")
        backbone.freeze()

    def why_not_exportable(self) -> str | None:
        """Mode ``whole`` exports; mode ``gt`` boxes come from the ground truth, which an exported model never sees."""
        if self.config.mode == "whole":
            return None
        return f"with mode={self.config.mode!r} it needs ground-truth labels at prediction time"

    def _logits_for_boxes(self, embedding: Tensor, boxes: Tensor | None,
                          points: tuple[Tensor, Tensor] | None = None) -> Tensor:
        sparse, dense = encode_prompts(self.backbone, points=points, boxes=boxes)
        pe = self.backbone.prompt_encoder.get_dense_pe()
        logits, _ = decode_masks(self.backbone.mask_decoder, embedding, pe, sparse, dense).select(False)
        return upsample_to(logits, self.input_size)  # B x 1 x S x S

    def forward(self, batch: dict) -> dict[str, Tensor]:
        embedding = self.features(batch).embedding
        b, size = embedding.shape[0], self.input_size
        if "points" in batch or "boxes" in batch:  # user prompts: a box and/or points (labels 1/0/-1)
            boxes = batch["boxes"].float() if "boxes" in batch else None
            points = (batch["points"].float(), batch["point_labels"].float()) if "points" in batch else None
            return {"logits": self._logits_for_boxes(embedding, boxes, points)}
        if self.config.mode == "whole":
            return {"logits": self._logits_for_boxes(embedding, whole_image_boxes(b, size, embedding.device))}
        if "label" not in batch:
            raise InputError("box-prompt", "mode 'gt' needs ground-truth labels at prediction time")
        per_class = []
        for k in range(1, self.num_classes + 1):
            boxes, present = label_boxes((batch["label"] == k).long())
            logits = self._logits_for_boxes(embedding, boxes)
            per_class.append(torch.where(present[:, None, None, None], logits, torch.full_like(logits, -20.0)))
        logits = torch.cat(per_class, dim=1)
        if self.num_classes > 1:
            logits = torch.cat([torch.zeros_like(logits[:, :1]), logits], dim=1)
        return {"logits": logits}

    def predict(self, batch: dict) -> Tensor:
        return logits_to_probabilities(self.forward(batch)["logits"])
