"""Segmentation losses shared by the methods (MONAI's DiceCE on logits; no double sigmoid)."""

from __future__ import annotations

import torch
from monai.losses import DiceCELoss
from torch import Tensor

from .base import resize_labels


def dice_ce_loss(logits: Tensor, labels: Tensor, lambda_dice: float = 1.0, lambda_ce: float = 1.0) -> Tensor:
    """DiceCE on logits B x C x h x w against an int label map B x H x W (nearest-resized to h x w).

    C = 1: binary (sigmoid, foreground = label > 0). C = K + 1: multi-class (softmax, one-hot labels).
    """
    target = resize_labels(labels, logits.shape[-1])
    if logits.shape[1] == 1:
        fn = DiceCELoss(sigmoid=True, lambda_dice=lambda_dice, lambda_ce=lambda_ce)
        return fn(logits, (target > 0).float()[:, None])
    fn = DiceCELoss(softmax=True, to_onehot_y=True, lambda_dice=lambda_dice, lambda_ce=lambda_ce)
    return fn(logits, target[:, None])


def with_background(class_logits: Tensor) -> Tensor:
    """Per-class foreground logits B x K x h x w -> softmax logits B x (K+1) x h x w with a zero background.

    For K = 1 this is returned unchanged (sigmoid(z) == softmax([0, z])[1]).
    """
    if class_logits.shape[1] == 1:
        return class_logits
    zeros = torch.zeros_like(class_logits[:, :1])
    return torch.cat([zeros, class_logits], dim=1)
