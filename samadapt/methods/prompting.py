"""Prompt helpers shared by the promptable methods: boxes and points in the S x S input frame."""

from __future__ import annotations

import torch
from torch import Tensor

from ..backbones.base import Backbone


def label_boxes(labels: Tensor) -> tuple[Tensor, Tensor]:
    """Tight boxes (x0, y0, x1, y1) around ``labels > 0`` per image: B x H x W -> (B x 4 float, B bool present)."""
    fg = labels > 0
    rows, cols = fg.any(dim=2), fg.any(dim=1)  # B x H, B x W
    present = rows.any(dim=1)
    h, w = labels.shape[-2:]
    ar_h = torch.arange(h, device=labels.device).expand_as(rows)
    ar_w = torch.arange(w, device=labels.device).expand_as(cols)
    y0 = torch.where(rows, ar_h, h).min(dim=1).values
    y1 = torch.where(rows, ar_h, -1).max(dim=1).values
    x0 = torch.where(cols, ar_w, w).min(dim=1).values
    x1 = torch.where(cols, ar_w, -1).max(dim=1).values
    boxes = torch.stack([x0, y0, x1, y1], dim=1).float()
    boxes[~present] = 0.0
    return boxes, present


def whole_image_boxes(batch: int, size: int, device: torch.device) -> Tensor:
    """The whole-image box [0, 0, S-1, S-1] for every image: B x 4."""
    return torch.tensor([0.0, 0.0, size - 1.0, size - 1.0], device=device).expand(batch, 4).clone()


def encode_prompts(backbone: Backbone, points: tuple[Tensor, Tensor] | None = None, boxes: Tensor | None = None,
                   masks: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """SAM prompt encoding with per-image prompts.

    points: (B x N x 2 coords (x, y) in the S x S frame, B x N labels 1/0/-1); boxes: B x 4; masks: B x 1 x 4h x 4w
    logits. Returns sparse B x N' x C and dense B x C x h x w embeddings.
    """
    pe = backbone.prompt_encoder
    box_arg = boxes[:, None, :] if boxes is not None else None
    sparse, dense = pe(points=points, boxes=box_arg, masks=masks)
    if masks is None:
        b = sparse.shape[0]
        dense = dense.expand(b, -1, -1, -1)
    return sparse, dense
