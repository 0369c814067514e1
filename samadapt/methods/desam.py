"""DeSAM (Gao et al., MICCAI 2024, arXiv 2306.00499): decoupled SAM for generalisable segmentation.

SAM's automatic mode degrades because a poor prompt gives a poor mask. DeSAM decouples the two: the prompt decides
only a *quality score*, while the mask comes from a decoder that sees the prompt only through SAM's prompt-attended
image tokens. Image encoder and prompt encoder stay frozen (training runs from the embedding cache, intermediates
included); the method owns and trains:

- **PRIM** (prompt-relevant IoU module): a trainable copy of the backbone's mask decoder, run with
  :func:`~samadapt.layers.shared_image_decoder.decode_tokens` (SAM's decoder without the unused upscaling). Its
  IoU head (first output) is the quality score, and its prompt-attended image tokens (B x 256 x h x w, the two-way
  transformer's ``src'``) are the mask embedding ``M``. SAM's ``output_upscaling`` and hypernetwork MLPs are
  unused by DeSAM (as in the release); they are kept frozen, so they are neither optimised nor stored in
  checkpoints.
- **PDMM** (prompt-decoupled mask module, ``PIMMDecoder`` in the release): a residual-SE U-Net
  (:mod:`samadapt.layers.res_se`, MONAI ``UnetResBlock`` + SE) that fuses ``M`` with the encoder's three
  intermediate maps ``f_a, f_b, f_c`` (shallow to deep; widths from ``backbone.intermediate_widths``; SAM ViT: the
  first three global-attention blocks; LiteMedSAM: TinyViT stages 1-3). Channels ``[c0, c1, c2]`` (paper: 256, 128,
  64). With ``h x w`` the embedding grid and ``4h x 4w`` the decoder's low-res size::

      ctx0 = Path(f_c -> c0, to h x w)      c0' = ResSE(cat(M, ctx0): 256 + c0 -> c0)      @ h x w
      ctx1 = Path(f_b -> c1, to 2h x 2w)    u1  = Up(c0' -> c1, skip ctx1)                  @ 2h x 2w
      ctx2 = Path(f_a -> c2, to 4h x 4w)    u2  = Up(u1 -> c2, skip ctx2)                   @ 4h x 4w
      logits = Conv1x1(c2 -> 1, no bias)(u2)                                                B x 1 x 4h x 4w

  A context path ``Path(f -> c, to T)`` is ``ResSE(C_f -> c)`` at the map's own size ``s``, then it adapts ``s`` to the
  target ``T``: ``log2(T / s)`` stages of ``[ConvT x2 -> ResSE]`` when ``T / s`` is a power of two >= 1 (SAM ViT and
  LiteMedSAM: every map is at the embedding grid, so the paths have 0, 1 and 2 stages exactly as in the paper);
  otherwise a parameter-free bilinear (up) or area (down) resize to ``T``. Map sizes are taken from
  ``config.intermediate_sizes``, else ``backbone.intermediate_sizes`` if the backbone declares it, else the embedding
  grid; a map of another size at run time is a clear error. The context paths do not depend on the prompt, so grid
  inference computes them once per image and reuses them for every point.

Modes (``mode``, training and inference):

- ``grid`` (DeSAM-P, the "segment-anything" mode). Training: one point per slice, drawn from the background with
  probability ``bg_point_prob`` (IoU target 0) else from the foreground (IoU target 1); the point's *label* is always
  1 (positive), as in the release; the mask target is always the full ground truth. Loss = DiceCE(sigmoid,
  squared_pred) + ``lambda_iou`` x L1 (or MSE) between PRIM's IoU and the 0/1 target. Points are drawn inside the
  un-padded image region when the batch carries ``pad``. Inference: an N x N point grid (``points_per_side``, 9),
  PRIM's IoU for every point (in batched calls of up to ``prim_batch`` prompts, the first block's image-side
  projections computed once per slice and every attention's projections folded to the token side, see
  :mod:`samadapt.layers.shared_image_decoder`; only the mask embeddings of points over ``pred_iou_thresh`` are
  kept), then the best candidates by IoU are decoded by PDMM ``points_per_batch`` at a time and
  post-processed (:func:`samadapt.layers.amg.select_masks`: IoU > ``pred_iou_thresh``, sigmoid >
  ``mask_threshold``, box NMS ``box_nms_thresh``, small regions < ``min_mask_region_area`` low-res pixels removed,
  the ``keep_masks`` best kept and merged; none left = empty prediction). Decoding stops as soon as the kept set is
  final, which gives the same result as decoding all candidates (see the amg module docstring). Validation during
  training scores ``val_mode``: the grid inference itself, a coarse ``val_points_per_side`` grid, or the whole box.
- ``box`` (DeSAM-B): the whole-image box (the un-padded region when ``pad`` is known) for every slice; loss DiceCE
  only; inference is a single forward.

``predict`` stays promptable: ``batch["points"]`` (B x N x 2, (x, y) in the S x S frame) with
``batch["point_labels"]`` (B x N; 1, 0, -1 padding) and/or ``batch["boxes"]`` (B x 4) replace the automatic prompts
(one forward, no IoU filtering). Probabilities: sigmoid of PDMM's logits (box mode, user prompts); the grid mode's
selected binary mask as 0/1 (resized bilinearly to S x S).

Fixed against the release: PDMM's input widths come from the backbone (the release hard-codes ViT-H's 1280 and so
only runs with ViT-H); no device literals. No ``faithful`` switch: the release's other problems (``cuda`` literals,
``type=bool`` flags, file-name parsing) have no behaviour worth reproducing. Deep supervision (off in the release)
is not implemented.

Shapes: B batch, S input size, h x w embedding grid, C_i intermediate widths, P points per chunk.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Sequence

import torch
import torch.nn.functional as F
from monai.losses import DiceCELoss
from torch import Tensor, nn

from ..backbones.base import Backbone, Features
from ..errors import ConfigError, InputError
from ..layers.amg import select_masks
from ..layers.res_se import UnetResSEBlock, UpResSEBlock, UpsampleResSE
from ..layers.shared_image_decoder import decode_tokens, image_side
from . import METHODS
from .base import Method, MethodConfig, resize_labels, upsample_to
from .options import option
from .prompting import encode_prompts

MODES = ("grid", "box")


@dataclass
class DeSAMConfig(MethodConfig):
    mode: str = option("grid", choices=MODES)
    """``grid`` (DeSAM-P: random point in training, N x N point grid at inference) or ``box`` (DeSAM-B: the
    whole-image box in training and inference)."""
    channels: list[int] = field(default_factory=lambda: [256, 128, 64])
    """PDMM widths [c0, c1, c2] at h x w, 2h x 2w, 4h x 4w (paper: 256, 128, 64)."""
    se_reduction: int = option(16, ge=1)
    """Squeeze-and-excitation reduction of the ResSE blocks (paper: 16)."""
    intermediate_sizes: list[int] | None = None
    """Side of each intermediate map (shallow to deep); default: the backbone's ``intermediate_sizes`` if it has
    one, else its embedding grid (true for every SAM ViT and for LiteMedSAM)."""
    bg_point_prob: float = option(0.5, ge=0, le=1)
    """Grid training: probability that the slice's point comes from the background (IoU target 0)."""
    iou_loss: str = option("l1", choices=("l1", "mse"))
    """``l1`` (paper) or ``mse`` between PRIM's IoU and the 0/1 target."""
    lambda_iou: float = option(1.0, ge=0)
    lambda_dice: float = option(1.0, ge=0)
    lambda_ce: float = option(1.0, ge=0)
    squared_pred: bool = True
    """MONAI DiceCE ``squared_pred`` (the release: True)."""
    points_per_side: int = option(9, ge=1)
    """Grid inference: N of the N x N point grid (paper: 9, 81 points)."""
    points_per_batch: int = option(9, ge=1)
    """Grid inference: most candidates per PDMM forward (paper: 9 prompts per forward)."""
    prim_batch: int = option(8, ge=1)
    """Grid inference: most point prompts per PRIM call; the points of whole slices are grouped when a slice has
    fewer (a 2 x 2 grid: two slices per call). Memory grows with it (about 4 MB per prompt and intermediate at a
    64 x 64 grid). The result does not depend on it. 8 keeps a call's image tokens in a CPU's cache (81 LiteMedSAM
    prompts on a loaded 2-core CPU: 8 per call 1.3x faster than 64); raise it on a GPU."""
    pred_iou_thresh: float = 0.5
    """Grid inference: keep candidates whose PRIM IoU exceeds this (paper: 0.5)."""
    mask_threshold: float = 0.5
    """Binarise the mask probability (sigmoid) above this (paper: 0.5)."""
    stability_score_thresh: float | None = None
    """SAM's stability filter; None = off (the release computes it but does not apply it)."""
    stability_score_offset: float = 1.0
    box_nms_thresh: float = 0.7
    """Box NMS IoU threshold between candidate masks (paper: 0.7)."""
    min_mask_region_area: int = option(1000, ge=0)
    """Holes and islands smaller than this many pixels of the 4h x 4w low-res mask are removed (paper: 1000 at
    256 x 256)."""
    keep_masks: int = option(1, ge=1)
    """Grid inference: the best masks kept after post-processing, merged into the prediction (paper: 1)."""
    val_mode: str = option("grid", choices=("grid", "coarse", "box"))
    """Grid mode, validation Dice during training: ``grid`` (the inference itself), ``coarse`` (the same grid
    inference on a ``val_points_per_side`` grid) or ``box`` (one whole-box forward, DeSAM-B's inference). The
    cheaper modes score the same PDMM; whether they pick the same checkpoint is not yet measured (the release
    selects on the validation loss, ``train.select_on: loss``, which needs no grid inference at all)."""
    val_points_per_side: int = option(3, ge=1)
    """``val_mode: coarse``: N of the N x N validation grid."""


def _pair(size: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(size, int):
        return (size, size)
    h, w = (int(v) for v in size)
    return (h, w)


class ContextPath(nn.Module):
    """One PDMM context path: ``ResSE(C_in -> C_out)`` at the map's size ``s``, then ``s`` -> ``target``.

    N x C_in x s -> N x C_out x target. Upsampling by a power of two r >= 1 uses log2(r) ``[ConvT x2 -> ResSE]``
    stages (learned, as in the paper); any other ratio uses a parameter-free bilinear (up) or area (down) resize.
    """

    def __init__(self, in_channels: int, out_channels: int, size: tuple[int, int], target: tuple[int, int],
                 se_reduction: int = 16):
        super().__init__()
        self.size, self.target = size, target
        self.block = UnetResSEBlock(2, in_channels, out_channels, se_reduction=se_reduction)
        ratios = {target[0] / size[0], target[1] / size[1]}
        self.stages = nn.ModuleList()
        self.resize = False
        ratio = ratios.pop() if len(ratios) == 1 else None
        if ratio is not None and ratio >= 1 and float(ratio).is_integer() and (int(ratio) & (int(ratio) - 1)) == 0:
            for _ in range(int(math.log2(ratio))):
                self.stages.append(UpsampleResSE(2, out_channels, out_channels, 2, se_reduction=se_reduction))
        else:
            self.resize = True

    def forward(self, x: Tensor) -> Tensor:
        if tuple(x.shape[-2:]) != self.size:
            raise InputError("desam", f"an intermediate map is {tuple(x.shape[-2:])}, PDMM was built for {self.size}; "
                                      "set the method option intermediate_sizes to the backbone's map sizes")
        x = self.block(x)
        for stage in self.stages:
            x = stage(x)
        if self.resize:
            down = self.target[0] < x.shape[-2]
            x = F.interpolate(x, size=self.target, mode="area" if down else "bilinear",
                              align_corners=None if down else False)
        return x


class PDMM(nn.Module):
    """Prompt-decoupled mask module: residual-SE U-Net over the mask embedding and three intermediate maps.

    ``context(intermediates)`` (prompt-independent) -> (ctx0 N x c0 x h x w, ctx1 N x c1 x 2h x 2w,
    ctx2 N x c2 x 4h x 4w); ``decode(M, context, index)`` with M P x D x h x w and ``index`` P (which image each
    embedding belongs to; default arange) -> logits P x 1 x 4h x 4w.
    """

    def __init__(self, widths: Sequence[int], sizes: Sequence[tuple[int, int]], embed_dim: int,
                 grid: tuple[int, int], channels: Sequence[int] = (256, 128, 64), se_reduction: int = 16):
        super().__init__()
        if len(widths) != 3 or len(sizes) != 3:
            raise ConfigError(f"PDMM needs three intermediate maps, got widths {list(widths)}")
        if len(channels) != 3:
            raise ConfigError(f"PDMM channels must be [c0, c1, c2], got {list(channels)}")
        c0, c1, c2 = (int(c) for c in channels)
        h, w = grid
        w_a, w_b, w_c = widths
        self.ctx0 = ContextPath(w_c, c0, sizes[2], (h, w), se_reduction)
        self.ctx1 = ContextPath(w_b, c1, sizes[1], (2 * h, 2 * w), se_reduction)
        self.ctx2 = ContextPath(w_a, c2, sizes[0], (4 * h, 4 * w), se_reduction)
        self.fuse = UnetResSEBlock(2, embed_dim + c0, c0, se_reduction=se_reduction)
        self.up1 = UpResSEBlock(2, c0, c1, 2, se_reduction=se_reduction)
        self.up2 = UpResSEBlock(2, c1, c2, 2, se_reduction=se_reduction)
        self.head = nn.Conv2d(c2, 1, kernel_size=1, bias=False)

    def context(self, intermediates: Sequence[Tensor]) -> tuple[Tensor, Tensor, Tensor]:
        f_a, f_b, f_c = intermediates
        return self.ctx0(f_c), self.ctx1(f_b), self.ctx2(f_a)

    def decode(self, mask_embedding: Tensor, context: tuple[Tensor, Tensor, Tensor],
               index: Tensor | None = None) -> Tensor:
        ctx0, ctx1, ctx2 = context
        if index is not None:
            ctx0, ctx1, ctx2 = ctx0[index], ctx1[index], ctx2[index]
        x = self.fuse(torch.cat([mask_embedding.to(ctx0.dtype), ctx0], dim=1))
        x = self.up1(x, ctx1)
        x = self.up2(x, ctx2)
        return self.head(x)

    def forward(self, mask_embedding: Tensor, intermediates: Sequence[Tensor]) -> Tensor:
        return self.decode(mask_embedding, self.context(intermediates))


def grid_points(n: int, height: float, width: float) -> Tensor:
    """SAM's N x N point grid over a ``height x width`` region: N^2 x 2 (x, y) at pixel-cell centres."""
    ticks = (torch.arange(n, dtype=torch.float32) + 0.5) / n
    ys, xs = torch.meshgrid(ticks * height, ticks * width, indexing="ij")
    return torch.stack([xs.flatten(), ys.flatten()], dim=1)


@METHODS.register
class DeSAM(Method):
    name = "desam"
    config_class = DeSAMConfig
    needs_intermediates = True
    max_classes = 1
    promptable = True
    prompt_kinds = ("points", "boxes")
    presets = {"cpu": "desam_cpu", "paper": "desam_paper", "paper_vit_h": "desam_paper_vit_h",
               "prostate": "desam_prostate"}
    benchmark_parts = ("latency", "cost")
    export_refusal = ("its inference works image by image (grid mode: IoU filter, box NMS, small-region removal and "
                      "lazy decoding, all data-dependent; box mode: per-image valid-size boxes), so the traced graph "
                      "has a fixed batch and fails on another batch size")
    split_export = True  # the frozen encoder (embedding + intermediates) is one graph; PRIM, PDMM, grid in Python

    def __init__(self, backbone: Backbone, config: DeSAMConfig, num_classes: int = 1):
        super().__init__(backbone, config, num_classes)
        widths = tuple(backbone.intermediate_widths)
        if len(widths) < 3:
            raise ConfigError(f"desam needs three intermediate maps; backbone {backbone.name!r} has {len(widths)}")
        backbone.freeze()
        grid = _pair(backbone.embed_grid)
        if config.intermediate_sizes is not None:
            sizes = [_pair(s) for s in config.intermediate_sizes]
        elif getattr(backbone, "intermediate_sizes", None):
            sizes = [_pair(s) for s in backbone.intermediate_sizes]
        else:
            sizes = [grid] * len(widths)
        if len(sizes) != len(widths):
            raise ConfigError(f"desam intermediate_sizes has {len(sizes)} entries, the backbone {len(widths)} maps")
        # PRIM: a trainable copy of SAM's mask decoder; the parts DeSAM does not use stay frozen.
        self.prim = copy.deepcopy(backbone.mask_decoder).requires_grad_(True)
        self.prim.output_upscaling.requires_grad_(False)
        self.prim.output_hypernetworks_mlps.requires_grad_(False)
        self.pdmm = PDMM(widths[:3], sizes[:3], backbone.embed_dim, grid, config.channels, config.se_reduction)
        self._dice_ce = DiceCELoss(sigmoid=True, squared_pred=config.squared_pred, lambda_dice=config.lambda_dice,
                                   lambda_ce=config.lambda_ce)

    # --- prompts ---------------------------------------------------------------------------------------------------
    def _valid_sizes(self, batch: dict, b: int) -> list[tuple[int, int]]:
        """Un-padded (height, width) of each image in the S x S frame (the whole frame without ``pad``)."""
        s = self.input_size
        if "pad" not in batch:
            return [(s, s)] * b
        from ..data.preprocessing import pad_infos

        return [(max(1, p.new_h), max(1, p.new_w)) for p in pad_infos(batch["pad"])]

    def _whole_boxes(self, batch: dict, b: int, device: torch.device) -> Tensor:
        sizes = self._valid_sizes(batch, b)
        return torch.tensor([[0.0, 0.0, w - 1.0, h - 1.0] for h, w in sizes], device=device)

    def sample_points(self, labels: Tensor, batch: dict, generator: torch.Generator | None = None
                      ) -> tuple[Tensor, Tensor]:
        """Grid-mode training prompt: one point per image, background with probability ``bg_point_prob``.

        labels: B x S x S. Returns coords B x 1 x 2 (x, y) and the IoU target B x 1 (1 foreground, 0 background).
        A slice without foreground (or without background) takes its point from the other set.
        """
        b, s = labels.shape[0], labels.shape[-1]
        fg = (labels > 0).detach().cpu().reshape(b, -1)
        valid = torch.zeros(b, s, s, dtype=torch.bool)
        for i, (h, w) in enumerate(self._valid_sizes(batch, b)):
            valid[i, :h, :w] = True
        bg = ~fg & valid.reshape(b, -1)
        want_bg = torch.rand(b, generator=generator) < self.config.bg_point_prob
        has_fg, has_bg = fg.any(dim=1), bg.any(dim=1)
        use_bg = torch.where(want_bg, has_bg | ~has_fg, ~has_fg)
        pool = torch.where(use_bg[:, None], bg, fg).float()
        pool[pool.sum(dim=1) == 0] = 1.0  # degenerate slice: anywhere
        flat = torch.multinomial(pool, 1, generator=generator)[:, 0]
        coords = torch.stack([flat % s, flat // s], dim=1).float()[:, None, :]
        target = fg.gather(1, flat[:, None]).float()
        return coords.to(labels.device), target.to(labels.device)

    def _prompt_embeddings(self, points: tuple[Tensor, Tensor] | None, boxes: Tensor | None) -> tuple[Tensor, Tensor]:
        return encode_prompts(self.backbone, points=points, boxes=boxes)

    # --- the two modules ------------------------------------------------------------------------------------------
    def prim_forward(self, embedding: Tensor, sparse: Tensor, dense: Tensor) -> tuple[Tensor, Tensor]:
        """PRIM: embedding B x 256 x h x w + prompts -> (IoU B x 1, mask embedding M B x 256 x h x w)."""
        side = image_side(self.prim, embedding, self.backbone.prompt_encoder.get_dense_pe(), dense)
        index = torch.arange(embedding.shape[0], device=embedding.device)
        iou, _, m = decode_tokens(self.prim, side, sparse, index, iou_only=True)
        return iou[:, :1], m

    def _intermediates(self, features: Features) -> list[Tensor]:
        if len(features.intermediates) < 3:
            raise InputError("desam", "the features hold no intermediate maps; encode with intermediates=True "
                                      "(or use an embedding cache built with intermediates)")
        return list(features.intermediates[:3])

    def _decode(self, features: Features, points: tuple[Tensor, Tensor] | None, boxes: Tensor | None
                ) -> dict[str, Tensor]:
        sparse, dense = self._prompt_embeddings(points, boxes)
        iou, m = self.prim_forward(features.embedding, sparse, dense)
        logits = self.pdmm(m, self._intermediates(features))
        return {"logits": logits, "iou": iou}

    @staticmethod
    def _user_prompts(batch: dict) -> tuple[tuple[Tensor, Tensor] | None, Tensor | None]:
        points = None
        if "points" in batch:
            coords = batch["points"].float()
            labels = batch.get("point_labels")
            if labels is None:
                labels = torch.ones(coords.shape[:2], device=coords.device)
            if coords.dim() != 3 or coords.shape[-1] != 2 or labels.shape != coords.shape[:2]:
                raise InputError("desam", f"points must be B x N x 2 with point_labels B x N, got "
                                          f"{tuple(coords.shape)} and {tuple(labels.shape)}")
            points = (coords, labels.to(coords.device).float())
        boxes = batch["boxes"].float() if "boxes" in batch else None
        return points, boxes

    # --- Method interface -----------------------------------------------------------------------------------------
    def forward(self, batch: dict) -> dict[str, Tensor]:
        """Training/validation forward: logits B x 1 x 4h x 4w, ``iou`` B x 1 and, in grid mode without user
        prompts, ``iou_target`` B x 1. User prompts in the batch replace the automatic ones."""
        features = self.features(batch)
        b, device = features.embedding.shape[0], features.embedding.device
        if "points" in batch or "boxes" in batch:
            return self._decode(features, *self._user_prompts(batch))
        if self.config.mode == "box":
            return self._decode(features, None, self._whole_boxes(batch, b, device))
        if "label" not in batch:
            raise InputError("desam", "grid-mode forward samples its point from batch['label']; use predict() "
                                      "for inference")
        generator = None if self.training else torch.Generator().manual_seed(0)  # fixed points for val loss
        coords, target = self.sample_points(batch["label"], batch, generator)
        out = self._decode(features, (coords, torch.ones(b, 1, device=device)), None)
        out["iou_target"] = target
        return out

    def loss(self, output: dict[str, Tensor], batch: dict) -> dict[str, Tensor]:
        logits = output["logits"].float()
        target = (resize_labels(batch["label"], logits.shape[-1]) > 0).float()[:, None]
        seg = self._dice_ce(logits, target)
        terms = {"dice_ce": seg}
        total = seg
        if "iou_target" in output:
            fn = F.l1_loss if self.config.iou_loss == "l1" else F.mse_loss
            iou_term = fn(output["iou"].float(), output["iou_target"].float())
            terms["iou"] = iou_term
            total = total + self.config.lambda_iou * iou_term
        terms["loss"] = total
        return terms

    @torch.no_grad()
    def predict(self, batch: dict) -> Tensor:
        """Probabilities B x 2 x S x S: user prompts if given, else the configured mode's automatic inference."""
        features = self.features(batch)
        if "points" in batch or "boxes" in batch:
            p = torch.sigmoid(upsample_to(self._decode(features, *self._user_prompts(batch))["logits"].float(),
                                          self.input_size))
            return torch.cat([1 - p, p], dim=1)
        if self.config.mode == "box":
            return self._box_probabilities(features, batch)
        return self._grid_probabilities(features, batch)

    @torch.no_grad()
    def validation_predict(self, batch: dict) -> Tensor:
        """Grid mode with ``val_mode`` coarse or box: the cheaper validation inference; otherwise ``predict``."""
        mode = self.config.val_mode
        if self.config.mode != "grid" or mode == "grid" or "points" in batch or "boxes" in batch:
            return self.predict(batch)
        features = self.features(batch)
        if mode == "box":
            return self._box_probabilities(features, batch)
        return self._grid_probabilities(features, batch, self.config.val_points_per_side)

    def _box_probabilities(self, features: Features, batch: dict) -> Tensor:
        """Whole-box inference: B x 2 x S x S (sigmoid of PDMM's logits)."""
        b, device = features.embedding.shape[0], features.embedding.device
        logits = self._decode(features, None, self._whole_boxes(batch, b, device))["logits"]
        p = torch.sigmoid(upsample_to(logits.float(), self.input_size))
        return torch.cat([1 - p, p], dim=1)

    def _grid_probabilities(self, features: Features, batch: dict, points_per_side: int | None = None) -> Tensor:
        """Grid inference: B x 2 x S x S (the selected binary mask as 0/1, resized bilinearly)."""
        masks = self.grid_masks(features, batch, points_per_side)
        fg = upsample_to(masks.float()[:, None], self.input_size).clamp(0, 1)
        return torch.cat([1 - fg, fg], dim=1)

    # --- grid inference -------------------------------------------------------------------------------------------
    @torch.no_grad()
    def grid_masks(self, features: Features, batch: dict | None = None, points_per_side: int | None = None
                   ) -> Tensor:
        """Automatic grid-mode masks: bool B x 4h x 4w (see the module docstring).

        The prompt-independent work (PDMM's context paths, PRIM's first-block image projections) runs once per
        slice; the grid points of as many whole slices as fit in ``prim_batch`` prompts go through PRIM in one call;
        only the mask embeddings of points over ``pred_iou_thresh`` are kept, and PDMM decodes them lazily.
        ``points_per_side`` replaces the configured grid side.
        """
        cfg = self.config
        emb = features.embedding
        b, device = emb.shape[0], emb.device
        context = self.pdmm.context(self._intermediates(features))
        side_n = points_per_side or cfg.points_per_side
        coords = [grid_points(side_n, h, w).to(device) for h, w in self._valid_sizes(batch or {}, b)]
        _, dense = self._prompt_embeddings((coords[0][:1, None], torch.ones(1, 1, device=device)), None)
        side = image_side(self.prim, emb, self.backbone.prompt_encoder.get_dense_pe(), dense[:1])
        n = len(coords[0])
        per_call = max(1, cfg.prim_batch // n)  # whole slices per PRIM call
        masks = []
        for g in range(0, b, per_call):
            images = list(range(g, min(b, g + per_call)))
            flat = torch.cat([coords[i] for i in images])
            index = torch.arange(g, g + len(images), device=device).repeat_interleave(n)
            scores, passing, embeddings = self._score_points(side, flat, index)
            for k, i in enumerate(images):
                mine = (passing >= k * n) & (passing < (k + 1) * n)
                masks.append(self._decode_candidates(scores[k * n:(k + 1) * n], passing[mine] - k * n,
                                                     embeddings[mine], context, i))
        return torch.stack(masks)

    def _prim_points(self, side: dict, coords: Tensor, index: Tensor) -> tuple[Tensor, Tensor]:
        """PRIM for P single-point prompts against their slices' ``side`` (:func:`image_side`): coords P x 2,
        index P -> (IoU P, mask embeddings M P x 256 x h x w)."""
        labels = torch.ones(coords.shape[0], 1, device=coords.device)
        sparse, _ = self._prompt_embeddings((coords[:, None, :], labels), None)
        iou, _, m = decode_tokens(self.prim, side, sparse, index, iou_only=True)
        return iou[:, 0], m

    def _score_points(self, side: dict, coords: Tensor, index: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """PRIM on P points in calls of ``prim_batch``; only the points over ``pred_iou_thresh`` keep their M.

        Returns (IoU P, indices K of the passing points, their M K x 256 x h x w)."""
        step = max(self.config.prim_batch, 1)
        scores, passing, embeddings = [], [], []
        for j in range(0, len(coords), step):
            iou, m = self._prim_points(side, coords[j:j + step], index[j:j + step])
            keep = torch.nonzero(iou > self.config.pred_iou_thresh)[:, 0]
            scores.append(iou)
            passing.append(keep + j)
            embeddings.append(m[keep])
        return torch.cat(scores), torch.cat(passing), torch.cat(embeddings)

    def _decode_candidates(self, scores: Tensor, candidates: Tensor, embeddings: Tensor,
                           context: tuple[Tensor, ...], image: int) -> Tensor:
        """One slice: PRIM IoU of its P points, its K candidates (indices) and their M -> bool mask 4h x 4w.

        PDMM decodes the candidates best IoU first in growing chunks and stops once the kept set is final."""
        cfg = self.config
        device = scores.device
        rank = torch.argsort(scores[candidates], descending=True)  # candidates, best PRIM IoU first
        order, embeddings = candidates[rank], embeddings[rank]
        lowres = tuple(4 * s for s in context[0].shape[-2:])
        probs, logits, cand_scores = [], [], []
        selection = None
        start, step = 0, cfg.keep_masks
        while start < len(order):  # decode lazily (growing chunks); stop once the kept set cannot change
            idx = slice(start, start + step)
            start, step = start + step, min(2 * step, max(cfg.points_per_batch, cfg.keep_masks))
            m = embeddings[idx]
            lg = self.pdmm.decode(m, context, torch.full((len(m),), image, dtype=torch.long, device=device))[:, 0]
            logits.append(lg.float())
            probs.append(torch.sigmoid(lg.float()))
            cand_scores.append(scores[order[idx]].float())
            selection = select_masks(
                torch.cat(probs), torch.cat(cand_scores), score_thresh=cfg.pred_iou_thresh,
                mask_threshold=cfg.mask_threshold, nms_thresh=cfg.box_nms_thresh,
                min_area=cfg.min_mask_region_area, top_k=cfg.keep_masks, logits=torch.cat(logits),
                stability_thresh=cfg.stability_score_thresh, stability_offset=cfg.stability_score_offset)
            if selection.complete:
                break
        # Diagnostics of the last slice (tests, logs): PRIM scores, candidates over the IoU threshold, decoded, kept.
        self.last_grid = {"scores": scores.detach(), "candidates": int(len(order)),
                          "decoded": sum(len(p) for p in probs),
                          "kept": 0 if selection is None else int(len(selection.masks))}
        if selection is None or not len(selection.masks):
            return torch.zeros(lowres, dtype=torch.bool, device=device)
        return selection.masks.any(dim=0)
