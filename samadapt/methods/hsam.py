"""H-SAM (Cheng et al., CVPR 2024): LoRA image encoder + two-stage hierarchical decoder, prompt-free, multi-class.

METHODS.md section 2. Shapes for a backbone with input ``S``, embedding grid ``h x w`` (``C = 256``), ``K`` foreground
classes and ``T = K + 1`` class tokens (background first); SAM ViT-B at 512 px: S = 512, h = w = 32.

Encoder. The method owns a deep copy of the backbone's image encoder with LoRA (rank 5) on q and v of every attention
block; its base weights are frozen, the shared ``backbone`` object is never modified (only frozen, as every method
does), so other methods built on it still see the original encoder. Fused ``qkv`` layers are adapted in their real
layout: contiguous q|k|v for SAM's ViT, per-head [q|k|v] for TinyViT (LiteMedSAM), see
``samadapt.layers.lora_heads``. Target patterns: ``HSAMConfig.lora_targets``, else the backbone's declared
``lora_targets``. Training goes through the encoder (no embedding cache); a
``batch["features"]`` from the frozen-backbone cache is ignored, because it lacks the LoRA update. The encoder's
frozen prefix (LiteMedSAM: patch embedding and stage 0) is computed once per slice and reused while training without
augmentation (``prefix_cache``, ``samadapt.methods.lora_encoder``); its BatchNorm layers stay in eval mode.

Prompt encoder. H-SAM trains the prompt encoder with no prompts; the only parameter that then reaches the output is
``no_mask_embed`` (the dense positional encoding is a fixed buffer), so the method owns a trainable copy of it.

Stage 1 (``HSAMStage1``): SAM's mask decoder (pretrained transformer, IoU token and upscaling; new, random
``T`` mask tokens and hypernetwork MLPs, as H-SAM re-initialises them) with H-SAM's block order (token-to-image ->
self-attention -> MLP -> image-to-token). Outputs: ``low`` B x T x 4h x 4w logits, the token-pixel map
``msk_feat = tokens @ image_tokens^T`` B x T x h x w, and the upscaled embedding ``up`` B x C/8 x 4h x 4w. The IoU
head is dropped (H-SAM never uses its output).

Stage 2 (``HSAMStage2``, random init):
1. feature noise (training only): ``E + N(0, 1) * feature_noise * (max(E) - min(E))``, the range taken per image
   (``feature_noise_range="image"``, default) or over the whole batch as the release does (``"batch"``); stage 1
   sees the clean ``E``;
2. prior ``P = softmax_c(bilinear(low, h x w))`` B x T x hw;
3. CMAttn on the token-pixel map average-pooled to at most ``cmattn_grid`` x ``cmattn_grid`` (``g x g``):
   T tokens of dimension g*g; training adds dropout (0.1) and class-balanced noise: labels nearest-downsampled to
   ``g x g`` (not ``Tensor.resize_``), the classes present in the batch ranked by pixel count (rarest first) and
   class ``c`` at rank ``r`` adds ``N(mean(X), sigma_r)`` at its pixels, with ``sigma`` = the release's 9-class
   profile (0.35, 0.3, 0.3, 0.2, 0.2, 0.1, 0.1, 0, 0) resampled to T ranks. Then MHSA -> LN -> MHSA -> LN(x + MLP)
   -> Linear(T -> 1) gives a map ``z`` B x 1 x g x g, upsampled to h x w, and ``src = src + src * a`` with
   ``a = sigmoid(z)`` (``cmattn_norm="sigmoid"``, default; sigmoid replaces the release's ReLU + softmax) or the
   release's ``softmax_dim1(ReLU(z))`` (``"faithful"``): a softmax over a size-1 axis, so ``a == 1``, ``src = 2 src``
   and CMAttn receives no gradient;
4. the stage-2 two-way transformer (H-SAM order, new T mask tokens as the only tokens) whose cross-attentions are
   multiplied by ``P`` (``mask_attention``), dropout 0.2 on the token-to-image output;
5. hierarchical pixel decoder: ``up2 = upscaling(src')`` B x C/8 x 4h x 4w, ``cat(up2, up)`` -> ``skip_connect`` ->
   B x C/16 x S x S (transposed convolutions while the resolution is below ``S``: two for SAM at 512, none for
   LiteMedSAM whose ``4h`` already equals ``S``; 3x3 convolutions otherwise), hypernetwork MLPs of 5 layers
   -> ``masks2`` B x T x S x S.

Loss per stage ``0.1 CE + 0.9 Dice`` (softmax, background included, squared denominators, whole-batch sums;
stage 1 at 4h x 4w against nearest-downsampled labels, stage 2 at S x S), combined as ``(1 - w) L1 + w L2`` with
``w = 0.6 ** (0.99 ** epoch)`` set by ``on_epoch_start``. The optimiser and schedule (AdamW, weight decay 0.1,
warmup + poly) come from the run's ``train`` section (see ``config/presets/hsam_paper.yaml``).

Inference (``inference_stage``): 1 = stage-1 logits bilinearly upsampled to S, 2 = stage-2 logits, 3 = their
average (the release's ``--stage 3``); softmax over the T channels.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from monai.losses import DiceCELoss
from segment_anything.modeling.common import LayerNorm2d, MLPBlock
from segment_anything.modeling.mask_decoder import MLP
from segment_anything.modeling.transformer import Attention
from torch import Tensor, nn

from ..backbones.base import Backbone
from ..errors import ConfigError
from ..layers.sam_decoder import upscale
from ..layers.two_way import MaskedTwoWayTransformer, run_two_way
from . import METHODS
from .base import Method, resize_labels, upsample_to
from .lora_encoder import LoRAEncoderMixin, PrefixReuseConfig
from .options import option

PAPER_NOISE_SIGMAS = (0.35, 0.3, 0.3, 0.2, 0.2, 0.1, 0.1, 0.0, 0.0)
"""The release's class-balancing noise scales for its 9 classes, rarest class first (utils.noise_list)."""


@dataclass
class HSAMConfig(PrefixReuseConfig):
    lora_rank: int = option(5, ge=1)
    """LoRA rank on q and v of every encoder attention block."""
    lora_targets: list[str] | None = None
    """fnmatch patterns of the encoder's fused qkv Linear layers; None: the backbone's ``lora_targets``."""
    inference_stage: int = option(3, choices=(1, 2, 3))
    """1: stage-1 logits (upsampled), 2: stage-2 logits, 3: their average (the paper's inference)."""
    feature_noise: float = option(0.2, ge=0)
    """Std of the training noise on stage 2's image embedding, as a fraction of the embedding's range; 0 disables."""
    feature_noise_range: str = option("image", choices=("image", "batch"))
    """Where that range is taken: image (each image's own) | batch (the whole batch's, as the release does)."""
    cmattn: bool = True
    """Class-balanced mask-guided self-attention (CMAttn) enhancement of the stage-2 embedding."""
    cmattn_norm: str = option("sigmoid", choices=("sigmoid", "faithful"))
    """sigmoid (intended, default) | faithful (the release's softmax over a size-1 axis: constant 1, no gradient)."""
    cmattn_grid: int = option(32, ge=1)
    """CMAttn works on the token-pixel map average-pooled to at most this many cells per side."""
    cmattn_heads: int = option(8, ge=1)
    cmattn_dropout: float = option(0.1, ge=0, le=1)
    """Training dropout on the token-pixel map before CMAttn."""
    class_noise: bool = True
    """Class-balanced noise on the token-pixel map during training (needs ``batch["label"]``); the release's 512 px
    decoder (its 10 % Synapse setting) has it commented out: false there."""
    class_noise_sigmas: list[float] | None = None
    """Noise std by class rank (rarest first), resampled to K + 1 ranks; None: the release's 9-class profile."""
    mask_attention: bool = True
    """Multiply stage 2's cross-attention by the stage-1 class probabilities (learnable mask cross-attention)."""
    attn_dropout: float = option(0.2, ge=0, le=1)
    """Dropout on stage 2's token-to-image attention output."""
    lambda_ce: float = option(0.1, ge=0)
    lambda_dice: float = option(0.9, ge=0)
    stage_weight_base: float = 0.6
    """Stage-2 loss weight w = base ** (decay ** epoch); 0.6 at epoch 0."""
    stage_weight_decay: float = 0.99


def resample_profile(profile: tuple[float, ...] | list[float], n: int) -> list[float]:
    """Linearly resample a rank profile (rarest first) to ``n`` ranks, keeping both ends (exact when lengths match)."""
    profile = [float(v) for v in profile]
    if n == len(profile):
        return profile
    if len(profile) == 1 or n == 1:
        return [profile[0]] * n
    xs = np.linspace(0, len(profile) - 1, n)
    return [float(v) for v in np.interp(xs, np.arange(len(profile)), profile)]


def stage2_weight(epoch: int, base: float = 0.6, decay: float = 0.99) -> float:
    """H-SAM's stage-2 loss weight ``base ** (decay ** epoch)`` (0.6 at epoch 0, about 0.975 at epoch 299)."""
    return base ** (decay ** epoch)


def _heads_for(dim: int, wanted: int) -> int:
    """The largest head count <= ``wanted`` dividing ``dim``."""
    return next(h for h in range(min(wanted, dim), 0, -1) if dim % h == 0)


class HSAMStage1(nn.Module):
    """Stage-1 decoder: SAM's pretrained transformer in H-SAM's block order (or SAM's, ``order="sam"``, for SAMed)
    with T new class tokens.

    forward(src B x C x h x w (embedding + dense prompt), pe 1 x C x h x w) -> dict:
    ``low`` B x T x 4h x 4w, ``msk_feat`` B x T x h x w, ``up`` B x C/8 x 4h x 4w.
    """

    def __init__(self, mask_decoder: nn.Module, num_tokens: int, order: str = "hsam"):
        super().__init__()
        self.order = order
        dim = mask_decoder.transformer_dim
        self.transformer = copy.deepcopy(mask_decoder.transformer)
        self.iou_token = copy.deepcopy(mask_decoder.iou_token)
        self.output_upscaling = copy.deepcopy(mask_decoder.output_upscaling)
        up_dim = mask_decoder.output_hypernetworks_mlps[0].layers[-1].out_features
        self.mask_tokens = nn.Embedding(num_tokens, dim)
        self.output_hypernetworks_mlps = nn.ModuleList(MLP(dim, dim, up_dim, 3) for _ in range(num_tokens))

    def forward(self, src: Tensor, pe: Tensor) -> dict[str, Tensor]:
        b, c, h, w = src.shape
        t = self.mask_tokens.num_embeddings
        tokens = torch.cat([self.iou_token.weight, self.mask_tokens.weight], dim=0).unsqueeze(0).expand(b, -1, -1)
        hs, keys = run_two_way(self.transformer, src, pe, tokens, order=self.order)
        mask_out = hs[:, 1:1 + t]  # B x T x C
        msk_feat = (mask_out @ keys.transpose(1, 2)).reshape(b, t, h, w)
        up = upscale(self.output_upscaling, keys.transpose(1, 2).reshape(b, c, h, w))
        hyper = torch.stack([mlp(mask_out[:, i]) for i, mlp in enumerate(self.output_hypernetworks_mlps)], dim=1)
        low = (hyper @ up.flatten(2)).reshape(b, t, *up.shape[-2:])
        return {"low": low, "msk_feat": msk_feat, "up": up}


class CMAttn(nn.Module):
    """Class-balanced mask-guided self-attention over T tokens of dimension ``dim = g*g`` (a pooled map).

    forward(x B x T x dim) -> spatial logits B x dim (one value per pooled pixel), before the normalisation.
    """

    def __init__(self, num_tokens: int, dim: int, heads: int = 8):
        super().__init__()
        heads = _heads_for(dim, heads)
        self.self_attn = Attention(dim, heads)
        self.norm1 = nn.LayerNorm(dim)
        self.self_attn2 = Attention(dim, heads)
        self.mlp = MLPBlock(dim, 2 * dim, nn.ReLU)
        self.norm2 = nn.LayerNorm(dim)
        self.select = nn.Linear(num_tokens, 1)

    def forward(self, x: Tensor) -> Tensor:
        x = self.norm1(self.self_attn(q=x, k=x, v=x))  # no residual (as released)
        x = self.self_attn2(q=x, k=x, v=x)
        x = self.norm2(x + self.mlp(x))
        return self.select(x.transpose(1, 2))[..., 0]  # B x dim


def _skip_connect(in_ch: int, mid_ch: int, out_ch: int, ups: int) -> nn.Sequential:
    """max(2, ups) blocks (conv + LN2d + GELU) halving channels in_ch -> mid_ch -> out_ch; the first ``ups`` blocks
    upsample x2 with a 2x2 transposed conv, the rest keep the size with a 3x3 conv."""
    layers: list[nn.Module] = []
    chans = [in_ch, mid_ch] + [out_ch] * (max(2, ups) - 1)
    for i in range(len(chans) - 1):
        if i < ups:
            layers.append(nn.ConvTranspose2d(chans[i], chans[i + 1], kernel_size=2, stride=2))
        else:
            layers.append(nn.Conv2d(chans[i], chans[i + 1], kernel_size=3, padding=1))
        layers += [LayerNorm2d(chans[i + 1]), nn.GELU()]
    return nn.Sequential(*layers)


class HSAMStage2(nn.Module):
    """Stage-2 hierarchical decoder (random init); see the module docstring for the steps.

    forward(src B x C x h x w, pe 1 x C x h x w, stage1 dict, labels optional B x S x S) -> B x T x S x S logits.
    """

    def __init__(self, config: HSAMConfig, num_tokens: int, dim: int, grid: tuple[int, int], input_size: int,
                 depth: int, mlp_dim: int, num_heads: int, stage1_up_dim: int):
        super().__init__()
        self.config = config
        h, w = grid
        self.pool = (min(h, config.cmattn_grid), min(w, config.cmattn_grid))
        low = 4 * h
        if input_size % low or (input_size // low) & (input_size // low - 1):
            raise ConfigError(f"hsam needs the input size ({input_size}) to be a power-of-two multiple of 4 x the "
                              f"embedding grid ({low})")
        ups = int(math.log2(input_size // low))
        self.mask_tokens = nn.Embedding(num_tokens, dim)
        self.cmattn = CMAttn(num_tokens, self.pool[0] * self.pool[1], config.cmattn_heads) if config.cmattn else None
        self.transformer = MaskedTwoWayTransformer(depth, dim, num_heads, mlp_dim, t2i_dropout=config.attn_dropout)
        self.output_upscaling = nn.Sequential(
            nn.ConvTranspose2d(dim, dim // 4, kernel_size=2, stride=2), LayerNorm2d(dim // 4), nn.GELU(),
            nn.ConvTranspose2d(dim // 4, dim // 8, kernel_size=2, stride=2), nn.GELU(),
        )
        self.skip_connect = _skip_connect(dim // 8 + stage1_up_dim, dim // 8, dim // 16, ups)
        self.output_hypernetworks_mlps = nn.ModuleList(MLP(dim, dim, dim // 16, 5) for _ in range(num_tokens))
        sigmas = config.class_noise_sigmas if config.class_noise_sigmas is not None else PAPER_NOISE_SIGMAS
        self.register_buffer("noise_sigmas", torch.tensor(resample_profile(sigmas, num_tokens)), persistent=False)

    # --- CMAttn ----------------------------------------------------------------------------------------------------
    def class_balanced_noise(self, x: Tensor, labels: Tensor) -> Tensor:
        """x B x T x g x g plus N(mean(x), sigma_rank(c)) at the pixels of each class c present in ``labels``.

        labels: B x S x S, nearest-downsampled to g x g; ranks by pixel count over the batch, rarest first.
        """
        t = x.shape[1]
        small = F.interpolate(labels[:, None].float(), size=x.shape[-2:], mode="nearest")[:, 0].long()
        small = small.clamp(0, t - 1)
        counts = torch.bincount(small.flatten(), minlength=t)
        present = torch.nonzero(counts > 0).flatten()
        ranked = present[torch.argsort(counts[present], stable=True)]
        sigma = torch.zeros(t, device=x.device, dtype=x.dtype)
        sigma[ranked] = self.noise_sigmas[: len(ranked)].to(x.dtype)
        noise = torch.randn_like(x) * sigma[small].unsqueeze(1) + x.mean()
        return x + noise

    def attention_map(self, msk_feat: Tensor, labels: Tensor | None) -> Tensor:
        """msk_feat B x T x h x w (+ labels B x S x S in training) -> enhancement weights ``a`` B x 1 x h x w."""
        b, t, h, w = msk_feat.shape
        x = msk_feat if (h, w) == self.pool else F.adaptive_avg_pool2d(msk_feat, self.pool)
        if self.training:
            x = F.dropout(x, self.config.cmattn_dropout, training=True)
            if self.config.class_noise and labels is not None:
                x = self.class_balanced_noise(x, labels)
        z = self.cmattn(x.flatten(2)).reshape(b, 1, *self.pool)
        if self.config.cmattn_norm == "faithful":
            a = torch.softmax(F.relu(z), dim=1)  # the release: a softmax over a size-1 axis, identically 1
        else:
            a = torch.sigmoid(z)
        return a if (h, w) == self.pool else F.interpolate(a, size=(h, w), mode="bilinear", align_corners=False)

    # --- forward ---------------------------------------------------------------------------------------------------
    def forward(self, src: Tensor, pe: Tensor, stage1: dict[str, Tensor], labels: Tensor | None = None) -> Tensor:
        b, c, h, w = src.shape
        t = self.mask_tokens.num_embeddings
        prior = None
        if self.config.mask_attention:
            low = F.interpolate(stage1["low"], size=(h, w), mode="bilinear", align_corners=False)
            prior = torch.softmax(low, dim=1).flatten(2)  # B x T x hw
        if self.cmattn is not None:
            src = src + src * self.attention_map(stage1["msk_feat"], labels)
        tokens = self.mask_tokens.weight.unsqueeze(0).expand(b, -1, -1)
        hs, keys = run_two_way(self.transformer, src, pe, tokens, order="hsam", prior=prior)
        up2 = upscale(self.output_upscaling, keys.transpose(1, 2).reshape(b, c, h, w))
        feat = self.skip_connect(torch.cat([up2, stage1["up"]], dim=1))  # B x C/16 x S x S
        hyper = torch.stack([mlp(hs[:, i]) for i, mlp in enumerate(self.output_hypernetworks_mlps)], dim=1)
        return (hyper @ feat.flatten(2)).reshape(b, t, *feat.shape[-2:])


@METHODS.register
class HSAM(LoRAEncoderMixin, Method):
    """H-SAM: ``forward`` returns ``logits`` (per ``inference_stage``, B x T x S x S), ``stage1`` (B x T x 4h x 4w)
    and ``stage2`` (B x T x S x S); ``loss`` the weighted two-stage DiceCE."""

    name = "hsam"
    config_class = HSAMConfig
    needs_encoder_grad = True
    max_classes = None
    presets = {"cpu": "hsam_cpu", "paper": "hsam_paper"}
    rescorings = {f"stage{k}": (f"method.options.inference_stage={k}",) for k in (1, 2)}
    benchmark_parts = ("latency", "cost")

    def __init__(self, backbone: Backbone, config: HSAMConfig, num_classes: int = 1):
        super().__init__(backbone, config, num_classes)
        self.setup_lora_encoder(backbone, config)
        t = num_classes + 1
        decoder = backbone.mask_decoder
        self.stage1 = HSAMStage1(decoder, t).requires_grad_(True)
        sam_tf = decoder.transformer
        self.stage2 = HSAMStage2(
            config, t, decoder.transformer_dim, tuple(backbone.embed_grid), backbone.input_size,
            depth=len(sam_tf.layers), mlp_dim=sam_tf.layers[0].mlp.lin1.out_features, num_heads=sam_tf.num_heads,
            stage1_up_dim=self.stage1.output_hypernetworks_mlps[0].layers[-1].out_features)
        self.stage2_weight = stage2_weight(0, config.stage_weight_base, config.stage_weight_decay)
        self._memo: tuple | None = None
        self.loss_fn = DiceCELoss(softmax=True, to_onehot_y=True, include_background=True, squared_pred=True,
                                  batch=True, smooth_nr=1e-5, smooth_dr=1e-5, lambda_dice=config.lambda_dice,
                                  lambda_ce=config.lambda_ce)

    def on_epoch_start(self, epoch: int, num_epochs: int) -> None:
        self.stage2_weight = stage2_weight(epoch, self.config.stage_weight_base, self.config.stage_weight_decay)

    def forward(self, batch: dict) -> dict[str, Tensor]:
        out = self._forward(batch)
        # Without autograd (validation), keep the output for a ``predict`` on the same, unchanged batch: the engine's
        # validation computes the loss and then predicts, which would run the LoRA encoder twice.
        image = batch["image"]
        remember = not torch.is_grad_enabled() and not image.is_inference()  # inference tensors have no version
        self._memo = (batch, image, image._version, out) if remember else None
        return out

    def predict(self, batch: dict) -> Tensor:
        """Probabilities B x T x S x S (``inference_stage``); reuses the output of a ``forward`` on this very batch
        made without autograd (same dict, same image tensor, not modified since)."""
        memo, self._memo = getattr(self, "_memo", None), None
        if (memo is not None and memo[0] is batch and memo[1] is batch["image"] and not self.training
                and memo[2] == batch["image"]._version):
            return self.output_probabilities(memo[3])
        return self.output_probabilities(self._forward(batch))

    def _forward(self, batch: dict) -> dict[str, Tensor]:
        embedding = self.features(batch).embedding  # B x C x h x w
        pe = self.backbone.prompt_encoder.get_dense_pe().to(embedding.dtype)  # 1 x C x h x w
        dense = self.no_mask_embed.reshape(1, -1, 1, 1).to(embedding.dtype)
        stage1 = self.stage1(embedding + dense, pe)
        noisy = embedding
        if self.training and self.config.feature_noise > 0:
            dims = (1, 2, 3) if self.config.feature_noise_range == "image" else (0, 1, 2, 3)
            span = embedding.amax(dim=dims, keepdim=True) - embedding.amin(dim=dims, keepdim=True)
            noisy = embedding + torch.randn_like(embedding) * self.config.feature_noise * span.detach()
        stage2 = self.stage2(noisy + dense, pe, stage1, batch.get("label") if self.training else None)
        size = self.input_size
        stage = self.config.inference_stage
        if stage == 1:
            logits = upsample_to(stage1["low"], size)
        elif stage == 2:
            logits = stage2
        else:
            logits = 0.5 * (upsample_to(stage1["low"], size) + stage2)
        return {"logits": logits, "stage1": stage1["low"], "stage2": stage2}

    def stage_losses(self, output: dict[str, Tensor], labels: Tensor) -> tuple[Tensor, Tensor]:
        """(stage-1 loss at 4h x 4w, stage-2 loss at S x S), each 0.1 CE + 0.9 Dice."""
        l1 = self.loss_fn(output["stage1"].float(), resize_labels(labels, output["stage1"].shape[-1])[:, None])
        l2 = self.loss_fn(output["stage2"].float(), resize_labels(labels, output["stage2"].shape[-1])[:, None])
        return l1, l2

    def loss(self, output: dict[str, Tensor], batch: dict) -> dict[str, Tensor]:
        l1, l2 = self.stage_losses(output, batch["label"])
        w = self.stage2_weight
        return {"loss": (1 - w) * l1 + w * l2, "loss_stage1": l1.detach(), "loss_stage2": l2.detach()}
