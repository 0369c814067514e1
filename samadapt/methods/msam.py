"""M-SAM (Shi et al., MICCAI 2024, arXiv 2403.05912): Mask-Enhanced Adapter + iterative refinement, 2D port.

METHODS.md section 4 (the release is 3D on SAM-Med3D; this is the 2D port of section 4.6). Shapes for a backbone with
input ``S``, embedding grid ``h x w`` and ``C = 256`` (LiteMedSAM: S = 256, h = w = 64; SAM ViT-B: S = 1024,
h = w = 64); low-res logits are ``4h x 4w``.

Parts and what trains (``param_groups``):

- image encoder: a deep copy of the backbone's encoder owned by the method, frozen, with LoRA (``lora_rank``, 4) on
  q and v of the attention ``qkv`` projections (full lr). Target patterns: the backbone's declared
  ``lora_targets``; the q/v update follows each projection's real layout (SAM's ViT: contiguous q|k|v; TinyViT: per head [q|k|v]), see
  ``samadapt.layers.lora_heads``. The shared ``backbone`` is never modified (only frozen). ``lora_rank=0`` keeps the encoder frozen without LoRA; the method then uses the backbone's encoder
  and the embedding cache (``needs_encoder_grad`` False), which is much cheaper on a CPU. The LoRA encoder's frozen
  prefix is computed once per slice and reused while training without augmentation (``prefix_cache``,
  ``samadapt.methods.lora_encoder``);
- prompt encoder and mask decoder: trainable copies at ``sam_lr_scale`` (0.1) x the learning rate;
- MEA (``samadapt.layers.mask_enhanced_adapter``): new, full lr; ``src = MEA(E, P)`` replaces SAM's ``E + dense``.

One refinement iteration (``step``): ``P = mask_downscaling(prev)`` from the previous low-res logits ``prev``
(B x 1 x 4h x 4w; zeros at the first iteration), sparse prompt = the iteration's click (and/or a whole-image box),
``logits = decoder(MEA(E, P), sparse)`` (single-mask output) -> B x 1 x 4h x 4w, which becomes ``prev``.

Training (``forward`` in train mode, K = ``train_iterations``; the release uses 11): with probability
``auto_train_fraction`` a batch runs the automatic chain (no clicks; first iteration from ``auto_start``), otherwise
the release's interactive chain: at every iteration one click drawn from the current error region of
``sigmoid(prev) > 0.5`` against the label (false negative -> positive click, false positive -> negative; a perfect
mask gives a padding point). The release thresholds the logits at 0.5 (``faithful=True``). Only the newest click is
given unless ``multi_click``. Nothing is detached between iterations (``detach_between_iterations=False``, as
released). The loss is the sum over iterations of DiceCE (sigmoid, squared denominators) at S x S.

Inference: ``predict`` returns the last iteration's probabilities; ``predict_iterations`` returns all of them.
Without ``batch["points"]`` it runs the automatic mode (``infer_iterations`` mask-only refinements, the first from an
empty mask or the whole-image box); with ``points`` (B x N x 2, (x, y) in the S x S frame) and ``point_labels`` (B x N;
1, 0, or -1 padding) it runs one iteration per click. ``refine(batch, n, mode="simulate")`` simulates corrective
clicks from the ground truth (the interactive evaluation protocol). ``samadapt.evaluation.protocols.refinement`` computes the Dice
curve over iterations and plots it.

Export: the automatic mode is one ONNX graph (LoRA merged, the ``infer_iterations`` steps unrolled), so the ONNX,
int8 and OpenVINO prediction paths run all of it; clicks run in PyTorch (``why_not_exportable``).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from monai.losses import DiceCELoss
from torch import Tensor, nn

from ..backbones.base import Backbone
from ..data.clicks import batch_clicks
from ..errors import ConfigError, InputError
from ..layers.lora import apply_lora, lora_parameters
from ..layers.lora_heads import apply_qv_lora
from ..layers.mask_enhanced_adapter import TOKEN_MODES, MaskEnhancedAdapter, attention_grid
from ..layers.sam_decoder import decode_masks
from . import METHODS
from .base import Method, logits_to_probabilities, upsample_to
from .lora_encoder import PrefixReuse, PrefixReuseConfig, keep_frozen_eval
from .lora_targets import lora_targets
from .options import option
from .prompting import whole_image_boxes

LORA_LAYOUTS = ("qv", "full")

AUTO_STARTS = ("empty", "box")
CLICK_MODES = ("random", "center")


@dataclass
class MSAMConfig(PrefixReuseConfig):
    lora_rank: int = option(4, ge=0)
    """LoRA rank on the image encoder's attention projections; 0 = frozen encoder, no LoRA (embedding cache usable)."""
    lora_targets: list[str] | None = None
    """fnmatch patterns of ``nn.Linear`` layers inside the image encoder; default: the backbone's ``lora_targets``."""
    lora_layout: str = option("qv", choices=LORA_LAYOUTS)
    """``qv``: SAMed's update of q and v only, placed by the projection's real layout (released); ``full``: one
    rank-r update of the whole projection (q, k and v)."""
    mea_tokens: str = option("pooled", choices=TOKEN_MODES)
    """MEA attention tokens: ``full`` (every embedding position, faithful, GPU) or ``pooled`` (average-pooled grid)."""
    mea_pool_size: int = option(32, ge=1)
    """Side of the pooled attention grid (``mea_tokens=pooled``)."""
    mea_heads: int = option(8, ge=1)
    mea_mlp_ratio: float = option(4.0, gt=0)
    """Hidden width of the MEA's MLPs as a multiple of C (4 as released)."""
    mea_blocks: int = option(1, ge=1)
    sam_lr_scale: float = option(0.1, ge=0)
    """Learning-rate factor of the prompt encoder and mask decoder copies (0.1 as released)."""
    train_iterations: int = option(11, ge=1)
    """K refinement iterations per training batch (11 in the release)."""
    infer_iterations: int = option(3, ge=1)
    """Mask-only refinement iterations in the automatic mode (``predict`` without clicks)."""
    auto_start: str = option("empty", choices=AUTO_STARTS)
    """First automatic iteration: ``empty`` (zero mask, no prompt) or ``box`` (zero mask + whole-image box)."""
    auto_train_fraction: float = option(0.5, ge=0, le=1)
    """Probability that a training batch runs the automatic (click-free) chain; 0 = the release (always clicks)."""
    multi_click: bool = False
    """Give every click so far at each iteration (the release's --multi_click); default only the newest."""
    click_mode: str = option("random", choices=CLICK_MODES)
    """Training clicks: ``random`` pixel of the error region (release) or ``center`` (deepest error pixel)."""
    eval_click_mode: str = option("center", choices=CLICK_MODES)
    """Simulated clicks in ``refine(mode="simulate")`` (evaluation): deterministic ``center`` by default."""
    validation_clicks: int = option(0, ge=0)
    """Validation and model selection with this many simulated corrective clicks per slice (``eval_click_mode``,
    from the labels; loss and Dice of that chain); 0 = the automatic mode (``infer_iterations``)."""
    detach_between_iterations: bool = False
    """Stop gradients between iterations (the release keeps the whole chain differentiable)."""
    squared_pred: bool = True
    """DiceCE with squared denominators, as released."""
    lambda_dice: float = option(1.0, ge=0)
    lambda_ce: float = option(1.0, ge=0)
    faithful: bool = False
    """Reproduce the release's click-region bug: threshold the previous *logits* at 0.5 instead of probability 0.5."""


@METHODS.register
class MSAM(Method):
    name = "msam"
    config_class = MSAMConfig
    needs_encoder_grad = True
    max_classes = 1
    promptable = True
    simulates_clicks = True
    prompt_kinds = ("points",)
    presets = {"cpu": "msam_cpu", "paper": "msam_paper"}
    benchmark_parts = ("latency", "cost")

    def __init__(self, backbone: Backbone, config: MSAMConfig, num_classes: int = 1):
        super().__init__(backbone, config, num_classes)
        backbone.freeze()
        self.image_encoder: nn.Module | None = None
        self.lora_layers: list[str] = []
        if config.lora_rank > 0:
            targets = lora_targets(backbone, config.lora_targets, self.name)
            self.image_encoder = copy.deepcopy(backbone.image_encoder)
            if config.lora_layout == "qv":
                self.lora_layers = apply_qv_lora(self.image_encoder, targets, config.lora_rank, freeze_base=True)
            else:
                self.lora_layers = apply_lora(self.image_encoder, targets, config.lora_rank, qv_only_for_qkv=False,
                                              freeze_base=True)
            self.encoder_run = PrefixReuse(backbone, self.image_encoder, config.prefix_cache, config.prefix_cache_mb)
        else:
            self.needs_encoder_grad = False  # frozen shared encoder: the engine may read the embedding cache
        self.prompt_encoder = copy.deepcopy(backbone.prompt_encoder).requires_grad_(True)
        self.mask_decoder = copy.deepcopy(backbone.mask_decoder).requires_grad_(True)
        self.mea = MaskEnhancedAdapter(backbone.embed_dim, tuple(backbone.embed_grid), config.mea_heads,
                                       config.mea_mlp_ratio, config.mea_tokens, config.mea_pool_size,
                                       config.mea_blocks)
        self.train(self.training)

    # --- modes and parameters -------------------------------------------------------------------------------------
    def train(self, mode: bool = True) -> "MSAM":
        """Train mode for the trainable parts (the LoRA encoder's too, as H-SAM and SAMed); the shared backbone and
        the frozen BatchNorm layers (TinyViT) stay in eval mode."""
        super().train(mode)
        if self.backbone is not None:
            self.backbone.eval()
        if self.image_encoder is not None:
            keep_frozen_eval(self.image_encoder)
        return self

    def set_fixed_inputs(self, fixed: bool) -> str | None:
        return None if self.image_encoder is None else self.encoder_run.set_fixed_inputs(fixed, self.name)

    def param_groups(self, lr: float) -> list[dict]:
        """LoRA + MEA at ``lr``; the prompt encoder and mask decoder copies at ``sam_lr_scale * lr``."""
        main = [p for p in self.mea.parameters() if p.requires_grad]
        if self.image_encoder is not None:
            main += [p for p in lora_parameters(self.image_encoder) if p.requires_grad]
        sam = [p for m in (self.prompt_encoder, self.mask_decoder) for p in m.parameters() if p.requires_grad]
        return [{"params": main, "lr": lr}, {"params": sam, "lr": lr * self.config.sam_lr_scale}]

    # --- building blocks -----------------------------------------------------------------------------------------
    def embed(self, batch: dict) -> Tensor:
        """Image embedding B x C x h x w: the LoRA encoder (gradients in training), or the frozen backbone/cache.

        A ``batch["features"]`` from the frozen-backbone cache lacks the LoRA update; with ``lora_rank > 0`` it is
        ignored and the method's own encoder runs."""
        if self.image_encoder is None:
            return self.features(batch).embedding
        image = batch["image"]
        if image.shape[-2:] != (self.input_size, self.input_size):
            raise InputError("msam", f"expected images of {self.input_size}x{self.input_size}, got "
                             f"{tuple(image.shape)}")
        x = self.backbone.preprocess(image)
        if self.training and torch.is_grad_enabled():
            return self.encoder_run(x, batch.get("key"))
        with torch.no_grad():
            return self.encoder_run(x, batch.get("key"))

    def step(self, embedding: Tensor, prev_logits: Tensor, points: tuple[Tensor, Tensor] | None = None,
             boxes: Tensor | None = None) -> Tensor:
        """One refinement iteration.

        embedding B x C x h x w; prev_logits B x 1 x 4h x 4w (low-res logits of the previous iteration, zeros at the
        first); points (B x N x 2 (x, y) in the S x S frame, B x N labels) or None; boxes B x 4 or None.
        Returns low-res logits B x 1 x 4h x 4w.
        """
        pe = self.prompt_encoder
        box_arg = boxes[:, None, :] if boxes is not None else None
        sparse, dense = pe(points=points, boxes=box_arg, masks=prev_logits)  # B x N' x C, B x C x h x w
        if sparse.shape[0] != embedding.shape[0]:
            sparse = sparse.expand(embedding.shape[0], -1, -1)
        src = self.mea(embedding, dense)
        zero = src.new_zeros(1, 1, 1, 1)  # decode_masks adds ``dense``; MEA already fused it
        logits, _ = decode_masks(self.mask_decoder, src, pe.get_dense_pe(), sparse, zero).select(False)
        return logits

    def _error_clicks(self, prev_logits: Tensor, label: Tensor, mode: str) -> tuple[Tensor, Tensor]:
        """Clicks from the error region of the previous prediction (at S x S) against ``label`` B x S x S."""
        with torch.no_grad():
            up = upsample_to(prev_logits.detach().float(), label.shape[-1])[:, 0]
            pred = up > 0.5 if self.config.faithful else up > 0.0
            return batch_clicks(pred, label > 0, mode)

    def refine(self, batch: dict, iterations: int, mode: str = "auto", embedding: Tensor | None = None,
               start: str | None = None, click_mode: str | None = None) -> list[Tensor]:
        """Run ``iterations`` refinement iterations; return the low-res logits of each (B x 1 x 4h x 4w).

        ``mode``: ``auto`` (no clicks; the first iteration from ``start``, default ``config.auto_start``),
        ``simulate`` (one corrective click per iteration from the error against ``batch["label"]``; needs labels), or
        ``clicks`` (click ``t`` of ``batch["points"]``/``batch["point_labels"]`` at iteration ``t``; ``iterations`` may
        not exceed N). ``multi_click`` gives all clicks so far at each iteration.
        """
        if mode not in ("auto", "simulate", "clicks"):
            raise ConfigError(f"msam refine mode must be auto, simulate or clicks, got {mode!r}")
        if embedding is None:
            embedding = self.embed(batch)
        b, dev = embedding.shape[0], embedding.device
        low = self.backbone.low_res_size
        prev = embedding.new_zeros(b, 1, low, low)
        start = start or self.config.auto_start
        if mode == "simulate" and "label" not in batch:
            raise InputError("msam", "simulated clicks need ground-truth labels (batch['label'])")
        if mode == "clicks":
            given_pts, given_lbl = self._given_clicks(batch)
            if iterations > given_pts.shape[1]:
                raise InputError("msam", f"{iterations} iterations need as many clicks, got {given_pts.shape[1]}")
        click_mode = click_mode or self.config.click_mode
        history_pts: list[Tensor] = []
        history_lbl: list[Tensor] = []
        outputs: list[Tensor] = []
        for t in range(iterations):
            points, boxes = None, None
            if mode == "auto":
                if t == 0 and start == "box":
                    boxes = whole_image_boxes(b, self.input_size, dev)
            else:
                if mode == "simulate":
                    pts, lbl = self._error_clicks(prev, batch["label"], click_mode)
                else:
                    pts, lbl = given_pts[:, t:t + 1], given_lbl[:, t:t + 1]
                history_pts.append(pts.to(dev, embedding.dtype))
                history_lbl.append(lbl.to(dev))
                if self.config.multi_click:
                    points = (torch.cat(history_pts, dim=1), torch.cat(history_lbl, dim=1))
                else:
                    points = (history_pts[-1], history_lbl[-1])
            mask_in = prev.detach() if self.config.detach_between_iterations else prev
            prev = self.step(embedding, mask_in, points, boxes)
            outputs.append(prev)
        return outputs

    @staticmethod
    def _given_clicks(batch: dict) -> tuple[Tensor, Tensor]:
        if "points" not in batch or "point_labels" not in batch:
            raise InputError("msam", "interactive mode needs batch['points'] (B x N x 2) and batch['point_labels']")
        pts, lbl = batch["points"].float(), batch["point_labels"].long()
        if pts.dim() != 3 or pts.shape[-1] != 2 or lbl.shape != pts.shape[:2]:
            raise InputError("msam", f"points must be B x N x 2 with point_labels B x N, got {tuple(pts.shape)} and "
                             f"{tuple(lbl.shape)}")
        return pts, lbl

    # --- Method interface ---------------------------------------------------------------------------------------
    def forward(self, batch: dict) -> dict[str, Tensor]:
        """``iterations``: B x K x 4h x 4w logits of every iteration; ``logits``: the last one, B x 1 x 4h x 4w.

        Training: K = ``train_iterations``, the automatic chain with probability ``auto_train_fraction``, else
        simulated error-region clicks. Evaluation: the given clicks (``points``) or the automatic mode
        (``infer_iterations``)."""
        if self.training:
            if "label" not in batch:
                raise InputError("msam", "training needs batch['label'] (the clicks come from its error region)")
            auto = bool(torch.rand(()) < self.config.auto_train_fraction)
            outs = self.refine(batch, self.config.train_iterations, "auto" if auto else "simulate")
        elif "points" in batch:
            outs = self.refine(batch, batch["points"].shape[1], "clicks")
        else:
            outs = self.refine(batch, self.config.infer_iterations, "auto")
        stacked = torch.cat(outs, dim=1)
        return {"logits": outs[-1], "iterations": stacked}

    def loss(self, output: dict[str, Tensor], batch: dict) -> dict[str, Tensor]:
        """Sum over iterations of DiceCE (sigmoid, squared denominators) at S x S; terms ``loss_it<t>`` per iteration."""
        fn = DiceCELoss(sigmoid=True, squared_pred=self.config.squared_pred, lambda_dice=self.config.lambda_dice,
                        lambda_ce=self.config.lambda_ce)
        target = (batch["label"] > 0).float()[:, None]
        its = output["iterations"]
        terms: dict[str, Tensor] = {}
        total = its.new_zeros(())
        for t in range(its.shape[1]):
            term = fn(upsample_to(its[:, t:t + 1], target.shape[-1]), target)
            terms[f"loss_it{t + 1}"] = term.detach()
            total = total + term
        terms["loss"] = total
        return terms

    def predict_iterations(self, batch: dict, iterations: int | None = None, mode: str | None = None,
                           embedding: Tensor | None = None) -> list[Tensor]:
        """Probabilities B x 2 x S x S after each iteration.

        ``mode`` defaults to ``clicks`` when ``batch["points"]`` is given (one iteration per click), else ``auto``
        (``iterations`` defaults to ``infer_iterations``); ``simulate`` uses corrective clicks from the labels.
        ``embedding`` (B x C x h x w): the image embedding when computed elsewhere (default: ``embed``)."""
        mode = mode or ("clicks" if "points" in batch else "auto")
        if iterations is None:
            iterations = batch["points"].shape[1] if mode == "clicks" else self.config.infer_iterations
        outs = self.refine(batch, iterations, mode, embedding, click_mode=self.config.eval_click_mode)
        return [logits_to_probabilities(upsample_to(o, self.input_size)) for o in outs]

    @property
    def image_encoder_module(self) -> nn.Module | None:
        return super().image_encoder_module if self.image_encoder is None else self.image_encoder

    def why_not_exportable(self) -> str | None:
        """The automatic chain (``infer_iterations`` click-free steps) is one graph: encoder, MEA and decoder
        unrolled. A pooled MEA grid that does not divide the embedding grid needs adaptive pooling of a size
        torch.onnx cannot read; clicks (the interactive mode) never enter an exported graph."""
        grid = tuple(self.backbone.embed_grid)
        pooled = attention_grid(grid, self.config.mea_tokens, self.config.mea_pool_size)
        if any(g % a for g, a in zip(grid, pooled)):
            return (f"the Mask-Enhanced Adapter pools its {grid[0]}x{grid[1]} grid to mea_pool_size="
                    f"{self.config.mea_pool_size}, not a divisor, with adaptive_avg_pool2d, which torch.onnx cannot "
                    f"export; choose a mea_pool_size that divides the grid")
        return None

    @property
    def validation_clicks(self) -> int:
        return self.config.validation_clicks

    def clicks_output(self, batch: dict, clicks: int) -> dict[str, Tensor]:
        """``forward``'s output after ``clicks`` corrective clicks (``eval_click_mode``) simulated from
        ``batch["label"]`` (B x S x S): ``iterations`` B x clicks x 4h x 4w, ``logits`` the last."""
        if clicks < 1:
            raise ConfigError(f"msam: simulated clicks must be >= 1, got {clicks}")
        outs = self.refine(batch, clicks, "simulate", click_mode=self.config.eval_click_mode)
        return {"logits": outs[-1], "iterations": torch.cat(outs, dim=1)}

    def predict(self, batch: dict) -> Tensor:
        """B x 2 x S x S: the last iteration (automatic, or after the last of ``batch["points"]``)."""
        return self.predict_iterations(batch)[-1]


__all__ = ["LORA_LAYOUTS", "MSAM", "MSAMConfig"]
