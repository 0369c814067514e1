"""Validation during training: loss and per-class Dice aggregated over all validation slices."""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch.utils.data import DataLoader, Dataset

from ..methods.base import Method, resize_labels
from ..overlap import class_counts, dice_from_counts
from .device import autocast


@torch.no_grad()
def validate(method: Method, ds: Dataset, collate: Callable, prepare: Callable[[dict], dict], batch_size: int,
             amp: str, device: torch.device) -> dict[str, Any]:
    """Mean validation loss and foreground Dice (slices pooled per class, then averaged over classes).

    A method with ``validation_clicks`` > 0 is scored after that many corrective clicks simulated from the labels
    (loss and Dice of the same chain), else from ``forward`` (loss) and ``validation_predict`` (Dice)."""
    method.eval()
    clicks = method.validation_clicks
    loader = DataLoader(ds, batch_size=batch_size, shuffle=False, collate_fn=collate)
    counts = torch.zeros(method.num_classes, 3, dtype=torch.float64)
    loss_sum, n = 0.0, 0
    for batch in loader:
        batch = prepare(batch)
        with autocast(device, amp):
            output = method.clicks_output(batch, clicks) if clicks else None
            if method.trainable:
                loss_sum += float(method.loss(output or method(batch), batch)["loss"]) * len(batch["label"])
                n += len(batch["label"])
            probs = method.output_probabilities(output) if clicks else method.validation_predict(batch)
        pred = probs.float().argmax(dim=1)
        label = resize_labels(batch["label"], pred.shape[-1])
        counts += class_counts(pred, label, range(1, method.num_classes + 1)).cpu()
    method.train()
    dice = dice_from_counts(counts)
    out = {"dice": float(dice.mean()), "loss": loss_sum / n if n else float("nan")}
    if method.num_classes > 1:
        out.update({f"dice_class{k + 1}": float(d) for k, d in enumerate(dice)})
    return out
