"""Automatic-mask-generation post-processing (SAM's ``SamAutomaticMaskGenerator`` steps, without cropping).

Given the candidate masks of one image (one per grid prompt) and their predicted quality scores,
:func:`select_masks` keeps the good ones, in this order (SAM's order with ``crop_n_layers=0``):

1. score filter: ``score > score_thresh``;
2. binarise: ``probability > mask_threshold`` (DeSAM binarises the sigmoid at 0.5, not the logit at 0);
   optional stability filter (``stability_score`` on logits; ``None`` = off);
3. empty masks are dropped;
4. box non-maximum suppression on the masks' bounding boxes (``torchvision.ops.nms``), greedy in score order;
5. small-region clean-up: holes, then islands smaller than ``min_area`` pixels are filled/removed (SAM's
   ``remove_small_regions``, here with ``scipy.ndimage``; as in SAM the largest island survives even when small);
6. the ``top_k`` highest-scoring survivors are returned, best first.

SAM's filter of boxes touching an inner crop edge is a no-op without crops (the only crop is the whole image) and is
not implemented. Unlike SAM, the clean-up step does not re-run NMS with "changed mask" scores: the returned order is
the score order. Every step is greedy in score order and never lets a lower-scored mask affect a higher-scored one,
so the result on the best ``n`` candidates equals the result on all candidates whenever it already holds ``top_k``
masks (:func:`select_masks` reports that via ``complete``), which lets callers decode candidates lazily.

Shapes: ``probs``/``logits`` N x H x W, ``scores`` N, boxes N x 4 (x0, y0, x1, y1) in pixels, inclusive.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor


@dataclass
class Selection:
    """Result of :func:`select_masks`: ``masks`` K x H x W bool (K <= top_k, best first), ``scores`` K,
    ``indices`` K (into the input), ``complete``: True when K == top_k (later candidates cannot change it)."""

    masks: Tensor
    scores: Tensor
    indices: Tensor
    complete: bool


def masks_to_boxes(masks: Tensor) -> Tensor:
    """Tight boxes of boolean masks N x H x W -> N x 4 float (x0, y0, x1, y1); empty masks give [0, 0, 0, 0]."""
    n, h, w = masks.shape
    if n == 0:
        return masks.new_zeros(0, 4, dtype=torch.float32)
    rows, cols = masks.any(dim=2), masks.any(dim=1)  # N x H, N x W
    ar_h = torch.arange(h, device=masks.device).expand(n, h)
    ar_w = torch.arange(w, device=masks.device).expand(n, w)
    y0 = torch.where(rows, ar_h, h).min(dim=1).values
    y1 = torch.where(rows, ar_h, -1).max(dim=1).values
    x0 = torch.where(cols, ar_w, w).min(dim=1).values
    x1 = torch.where(cols, ar_w, -1).max(dim=1).values
    boxes = torch.stack([x0, y0, x1, y1], dim=1).float()
    boxes[~rows.any(dim=1)] = 0.0
    return boxes


def stability_score(logits: Tensor, threshold: float, offset: float) -> Tensor:
    """SAM's stability: IoU of ``logits > threshold + offset`` with ``logits > threshold - offset`` (N)."""
    inter = (logits > threshold + offset).flatten(1).sum(1).float()
    union = (logits > threshold - offset).flatten(1).sum(1).float()
    return torch.where(union > 0, inter / union.clamp_min(1), torch.zeros_like(union))


def remove_small_regions(mask: np.ndarray, min_area: int) -> np.ndarray:
    """SAM's clean-up of one boolean mask H x W: fill holes smaller than ``min_area`` pixels, then remove islands
    smaller than ``min_area`` (8-connectivity for both, as SAM's ``cv2.connectedComponentsWithStats(..., 8)``).
    As in SAM, when every island is small the largest one is kept, so a non-empty mask stays non-empty."""
    from scipy import ndimage

    if min_area <= 0 or not mask.any():
        return mask
    structure = np.ones((3, 3), dtype=bool)
    out = mask.copy()
    holes, n = ndimage.label(~out, structure=structure)
    if n:
        sizes = np.bincount(holes.ravel(), minlength=n + 1)[1:]
        small = np.flatnonzero(sizes < min_area) + 1
        if small.size:
            out[np.isin(holes, small)] = True
    islands, n = ndimage.label(out, structure=structure)
    if n:
        sizes = np.bincount(islands.ravel(), minlength=n + 1)[1:]
        big = np.flatnonzero(sizes >= min_area) + 1
        if big.size < n:
            out = np.isin(islands, big if big.size else [int(np.argmax(sizes)) + 1])
    return out


def select_masks(probs: Tensor, scores: Tensor, *, score_thresh: float = 0.5, mask_threshold: float = 0.5,
                 nms_thresh: float = 0.7, min_area: int = 0, top_k: int = 1, logits: Tensor | None = None,
                 stability_thresh: float | None = None, stability_offset: float = 1.0) -> Selection:
    """Filter, de-duplicate and rank the candidate masks of one image (see the module docstring).

    probs: N x H x W probabilities; scores: N predicted quality (DeSAM: PRIM's IoU); logits: N x H x W, needed only
    for the stability filter (its threshold is the logit of ``mask_threshold``).
    """
    from torchvision.ops import nms

    if probs.dim() != 3 or scores.shape != probs.shape[:1]:
        raise ValueError(f"select_masks: probs N x H x W and scores N expected, got {tuple(probs.shape)}, "
                         f"{tuple(scores.shape)}")
    h, w = probs.shape[-2:]
    empty = Selection(probs.new_zeros(0, h, w, dtype=torch.bool), scores.new_zeros(0),
                      torch.zeros(0, dtype=torch.long, device=probs.device), False)
    keep = torch.nonzero(scores > score_thresh).flatten()
    binary = probs[keep] > mask_threshold
    if stability_thresh is not None:
        if logits is None:
            raise ValueError("select_masks: the stability filter needs the logits")
        level = float(np.log(mask_threshold / (1 - mask_threshold)))
        stable = stability_score(logits[keep], level, stability_offset) >= stability_thresh
        keep, binary = keep[stable], binary[stable]
    nonempty = binary.flatten(1).any(dim=1)
    keep, binary = keep[nonempty], binary[nonempty]
    if keep.numel() == 0:
        return empty
    boxes = masks_to_boxes(binary)
    order = nms(boxes, scores[keep].float(), nms_thresh)  # indices into keep, by decreasing score
    kept_masks, kept_idx = [], []
    for j in order.tolist():
        m = binary[j]
        if min_area > 0:
            m = torch.from_numpy(remove_small_regions(m.cpu().numpy(), min_area)).to(binary.device)
        if not m.any():
            continue
        kept_masks.append(m)
        kept_idx.append(int(keep[j]))
        if len(kept_masks) == top_k:
            break
    if not kept_masks:
        return empty
    idx = torch.tensor(kept_idx, dtype=torch.long, device=probs.device)
    return Selection(torch.stack(kept_masks), scores[idx], idx, len(kept_masks) == top_k)


__all__ = ["Selection", "masks_to_boxes", "remove_small_regions", "select_masks", "stability_score"]
