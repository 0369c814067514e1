"""HeterSAM (METHODS.md section 1): a Swin-U dense prompt encoder and a deformable two-way cross-attention fusion with
an SE gate in front of a frozen SAM; prompt-free, one foreground class.

Pipeline (S = backbone input size, h x w = embedding grid, P = ``prompt_size``)::

    image B x 3 x S x S --frozen encoder (or the embedding cache)--> E  B x 256 x h x w
    preprocess(image) resized to P x P --SwinUPromptEncoder--------> D  B x 256 x h x w   (tanh)
    fusion: none  -> E' = E
            se / deformable_se -> E' = E + Z(DeformableTwoWayBlock(D, E))   (Z zero-initialised)
    FROZEN mask decoder(E' + D, dense PE, no sparse prompt) -> mask token 0 -> logits B x 1 x 4h x 4w
    optional light head(E' + D) -> logits B x 1 x 4h x 4w   (replaces the SAM decoder at inference)

The light head's training path: trained beside the full path on its labels plus a distillation term towards the
full path's probabilities (``light_distil``), then, for the last ``light_epochs`` epochs of the run, alone: the
prompt encoder and fusion are frozen (eval mode, no gradient) and the full path is only its teacher. With
``inference_decoder: light`` the run's checkpoint is chosen on the light head's validation Dice.

SAM (image encoder, prompt encoder, mask decoder) is frozen and stays in eval mode; gradients flow *through* the
frozen mask decoder into the fusion block and the prompt encoder, which are the only trained parts (plus the
optional light head). The released code's deformable attention was never wired and had no sampling offsets; the
fusion block is samadapt's design of METHODS.md 1.4 ([ours]), see ``samadapt/layers/deformable_attention.py``.

Fixed versus the release (``faithful=True`` restores the first two, ``double_normalise=True`` the third):

- loss: BCE + soft Dice (Tversky alpha = beta = 0.5, smooth 1, per image) on ``sigmoid(logits)``; the release
  min-max normalises each sample's logits to [0, 1] instead (so every slice, even an empty one, has a pixel at 1);
- prediction: ``sigmoid(logits)``; the release thresholds the min-max normalised map;
- normalisation: the image is normalised once. The release normalises it in the dataset and again in SAM's
  ``preprocess``, so SAM's encoder sees ``(x' - mean) / std`` of the normalised ``x'``, a nearly constant image
  (the prompt branch sees ``x'``). That needs the encoder run on every step (``data.cache=off``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..backbones.base import Backbone
from ..errors import ConfigError
from ..layers.deformable_attention import OFFSET_INITS, DeformableSEFusion
from ..layers.sam_decoder import decode_masks, empty_sparse
from . import METHODS
from .base import Method, MethodConfig, resize_labels, upsample_to
from .options import option

FUSIONS = ("none", "se", "deformable_se")
DECODER_ACTS = ("none", "relu", "gelu")
INFERENCE_DECODERS = ("full", "light")

SWIN_PRESETS = {
    # Swin-T-like (default): ~28M parameters in the Swin stages.
    "tiny": {"embed_dim": 96, "depths": (2, 2, 6, 2), "num_heads": (3, 6, 12, 24)},
    # Swin-B-like, as the release (models_swin/model_single.py: MultiScaleSwin): ~87M.
    "base": {"embed_dim": 128, "depths": (2, 2, 18, 2), "num_heads": (4, 8, 16, 32)},
}


@dataclass
class HeterSAMConfig(MethodConfig):
    fusion: str = option("deformable_se", choices=FUSIONS)
    """Fusion of E with the dense prompt D before the frozen decoder: none | se | deformable_se."""
    prompt_size: int | None = None
    """Side of the prompt branch's input; None: min(8 x embedding grid, input size) (SAM 1024 -> 512)."""
    embed_dim: int = 96
    """Swin patch-embedding width (Swin-T 96; Swin-B 128)."""
    depths: tuple[int, ...] = (2, 2, 6, 2)
    """Swin blocks per stage (Swin-T 2,2,6,2; Swin-B 2,2,18,2)."""
    num_heads: tuple[int, ...] = (3, 6, 12, 24)
    """Swin attention heads per stage (Swin-T 3,6,12,24; Swin-B 4,8,16,32)."""
    window_size: int = 7
    patch_size: int = 4
    drop_path: float = option(0.1, ge=0, le=1)
    """Stochastic depth, rising linearly over the Swin blocks to this value (release: 0.3 with Swin-B)."""
    decoder_act: str = option("none", choices=DECODER_ACTS)
    """Activation after each U-decoder conv + BN: none (as released: no nonlinearity before the final tanh) |
    relu | gelu."""
    fusion_depth: int = 1
    """Two-way fusion blocks."""
    fusion_heads: int = 8
    fusion_points: int = 4
    """Sampling points K per head (deformable_se)."""
    fusion_mlp_dim: int = 1024
    fusion_downsample: int = 2
    """Cross-attention internal width = 256 / this (SAM: 2)."""
    se_reduction: int = 4
    """SE gate on the values: hidden width C / this."""
    kv_grid: int = option(16, ge=0)
    """fusion=se only: keys/values average-pooled to at most kv_grid x kv_grid (0: full grid)."""
    offset_init: str = option("ring", choices=OFFSET_INITS)
    """ring (head h looks along direction 2 pi h / H, its K points 1..K pixels out: the points start apart and learn
    apart) | zero (every point at the reference; the K points of a head then stay identical: ablation only)."""
    fusion_zero_init: bool = True
    """Zero-initialise the fusion output so that E' = E at initialisation."""
    light_decoder: bool = False
    """Train a small head on E' + D that can replace SAM's mask decoder at inference."""
    light_channels: int = 32
    light_weight: float = option(1.0, ge=0)
    """Weight of the light head's loss (its BCE + Dice against the labels + light_distil x distillation) beside the
    full path's."""
    light_detach: bool = True
    """Stop the light head's gradient at its input, so that the full path trains exactly as without it."""
    light_distil: float = option(1.0, ge=0)
    """Weight of the light head's distillation term: BCE of its output against the full path's detached
    probabilities (0: labels only)."""
    light_epochs: int = option(0, ge=0)
    """The light head's own phase: the last light_epochs epochs of the run (counted in train.epochs, so give a
    budget in epochs) train the light head alone, prompt encoder and fusion frozen, the full path its teacher."""
    inference_decoder: str = option("full", choices=INFERENCE_DECODERS)
    """full (frozen SAM decoder) | light (the light head; needs light_decoder). Also what validation scores, so
    light chooses the checkpoint on the light head."""
    lambda_bce: float = option(1.0, ge=0)
    lambda_dice: float = option(1.0, ge=0)
    faithful: bool = False
    """Release behaviour: loss and prediction on per-sample min-max normalised logits."""
    double_normalise: bool = False
    """Release behaviour: SAM's encoder sees the image normalised twice (needs data.cache=off)."""
    swin_preset: str | None = option(None, choices=tuple(SWIN_PRESETS))
    """tiny | base: overrides embed_dim, depths and num_heads with that preset."""

    def check(self) -> None:
        if self.inference_decoder == "light" and not self.light_decoder:
            raise ConfigError("hetersam: inference_decoder='light' needs light_decoder=true")
        if self.light_epochs and not self.light_decoder:
            raise ConfigError("hetersam: light_epochs needs light_decoder=true")


class _ConvBN(nn.Sequential):
    def __init__(self, cin: int, cout: int, act: str):
        layers: list[nn.Module] = [nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout)]
        if act == "relu":
            layers.append(nn.ReLU(inplace=True))
        elif act == "gelu":
            layers.append(nn.GELU())
        super().__init__(*layers)


class SwinUPromptEncoder(nn.Module):
    """Swin encoder + small U-decoder: image B x 3 x P x P -> dense prompt B x ``out_dim`` x h x w in (-1, 1).

    Patch embedding: ``Conv2d(3, C, patch, patch)`` (no norm, as released). Stage i (timm
    ``SwinTransformerStage``; patch merging at the start of stages 1..n-1) has width C * 2^i on a
    (P / patch) / 2^i grid, followed by a LayerNorm. The U-decoder uses the stages whose grid is not finer than
    h x w (release at P = 512, h = 64: stages 1..3): from the deepest, ``z = BN(Conv3x3(cat(up(z), s_j)))`` with
    the width of s_j, then ``D = tanh(BN(Conv3x3(z -> out_dim)))``, bilinearly resized to h x w if needed.
    ``up`` is bilinear with ``align_corners=True``. Random initialisation (no pretrained Swin, as released).
    """

    def __init__(self, img_size: int, out_grid: tuple[int, int], out_dim: int = 256, embed_dim: int = 96,
                 depths: tuple[int, ...] = (2, 2, 6, 2), num_heads: tuple[int, ...] = (3, 6, 12, 24),
                 window_size: int = 7, patch_size: int = 4, drop_path: float = 0.1, decoder_act: str = "none"):
        super().__init__()
        from timm.models.swin_transformer import SwinTransformerStage

        if len(depths) != len(num_heads):
            raise ConfigError(f"depths {depths} and num_heads {num_heads} must have the same length")
        if decoder_act not in DECODER_ACTS:
            raise ConfigError(f"decoder_act must be one of {DECODER_ACTS}, got {decoder_act!r}")
        grid0 = img_size // patch_size
        if img_size % patch_size or grid0 % (2 ** (len(depths) - 1)):
            raise ConfigError(f"prompt size {img_size} must be divisible by patch {patch_size} x "
                              f"2^{len(depths) - 1} (the Swin stages halve the grid)")
        self.img_size, self.out_grid = img_size, tuple(out_grid)
        self.patch_embed = nn.Conv2d(3, embed_dim, patch_size, patch_size)
        total = sum(depths)
        dpr = [drop_path * i / max(total - 1, 1) for i in range(total)]  # timm's linear stochastic-depth rule
        widths = [embed_dim * 2 ** i for i in range(len(depths))]
        self.grids = [grid0 // 2 ** i for i in range(len(depths))]
        stages, norms = [], []
        for i, (depth, heads) in enumerate(zip(depths, num_heads)):
            stages.append(SwinTransformerStage(
                dim=widths[max(i - 1, 0)], out_dim=widths[i], input_resolution=(self.grids[max(i - 1, 0)],) * 2,
                depth=depth, downsample=i > 0, num_heads=heads, window_size=window_size,
                drop_path=dpr[sum(depths[:i]):sum(depths[:i + 1])]))
            norms.append(nn.LayerNorm(widths[i]))
        self.stages = nn.ModuleList(stages)
        self.norms = nn.ModuleList(norms)
        used = [i for i, g in enumerate(self.grids) if g <= out_grid[0]] or [len(depths) - 1]
        self.first_used = used[0]
        self.ups = nn.ModuleList(_ConvBN(widths[j + 1] + widths[j], widths[j], decoder_act)
                                 for j in range(len(depths) - 2, self.first_used - 1, -1))
        self.head = nn.Sequential(nn.Conv2d(widths[self.first_used], out_dim, 3, padding=1), nn.BatchNorm2d(out_dim),
                                  nn.Tanh())

    def stage_outputs(self, x: Tensor) -> list[Tensor]:
        """x B x 3 x P x P -> per-stage maps NCHW, B x C*2^i x g_i x g_i."""
        if x.shape[-2:] != (self.img_size, self.img_size):
            raise ValueError(f"Swin-U prompt encoder expects {self.img_size}x{self.img_size}, got {tuple(x.shape)}")
        t = self.patch_embed(x).permute(0, 2, 3, 1)  # NHWC
        outs = []
        for stage, norm in zip(self.stages, self.norms):
            t = stage(t)
            outs.append(norm(t).permute(0, 3, 1, 2))
        return outs

    def forward(self, x: Tensor) -> Tensor:
        feats = self.stage_outputs(x)
        z = feats[-1]
        for up, j in zip(self.ups, range(len(feats) - 2, self.first_used - 1, -1)):
            skip = feats[j]
            z = F.interpolate(z, size=skip.shape[-2:], mode="bilinear", align_corners=True)
            z = up(torch.cat([z, skip], dim=1))
        d = self.head(z)
        if tuple(d.shape[-2:]) != self.out_grid:
            d = F.interpolate(d, size=self.out_grid, mode="bilinear", align_corners=False)
        return d


class LightMaskHead(nn.Module):
    """Low-latency replacement of SAM's mask decoder: B x C x h x w -> logits B x 1 x 4h x 4w.

    Conv1x1(C -> c) + BN + GELU, Conv3x3(c -> c) + BN + GELU, two ConvT x2 (c -> c/2 -> c/4) + GELU, Conv1x1 -> 1.
    """

    def __init__(self, dim: int = 256, channels: int = 32):
        super().__init__()
        c2, c4 = max(channels // 2, 1), max(channels // 4, 1)
        self.net = nn.Sequential(
            nn.Conv2d(dim, channels, 1), nn.BatchNorm2d(channels), nn.GELU(),
            nn.Conv2d(channels, channels, 3, padding=1), nn.BatchNorm2d(channels), nn.GELU(),
            nn.ConvTranspose2d(channels, c2, 2, stride=2), nn.GELU(),
            nn.ConvTranspose2d(c2, c4, 2, stride=2), nn.GELU(),
            nn.Conv2d(c4, 1, 1))

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


def minmax_normalise(logits: Tensor) -> Tensor:
    """The release's ``norm_batch``: per-sample (x - min) / (max - min) over C x H x W, B x ... -> same shape."""
    flat = logits.flatten(1)
    lo, hi = flat.min(dim=1).values, flat.max(dim=1).values
    shape = (-1,) + (1,) * (logits.dim() - 1)
    return (logits - lo.view(shape)) / (hi - lo).clamp_min(1e-8).view(shape)


def soft_dice_loss(probs: Tensor, target: Tensor, smooth: float = 1.0) -> Tensor:
    """1 - Tversky index (alpha = beta = 0.5, the release's ``Dice_loss``) per image, averaged: B x 1 x H x W."""
    dims = tuple(range(1, probs.dim()))
    tp = (probs * target).sum(dims)
    fn = ((1 - probs) * target).sum(dims)
    fp = (probs * (1 - target)).sum(dims)
    return 1 - ((tp + smooth) / (tp + 0.5 * fn + 0.5 * fp + smooth)).mean()


@METHODS.register
class HeterSAM(Method):
    """HeterSAM: see the module docstring. ``forward`` returns ``logits`` (B x 1 x 4h x 4w), ``dense`` (D) and,
    with ``light_decoder``, ``light_logits`` (B x 1 x 4h x 4w)."""

    name = "hetersam"
    config_class = HeterSAMConfig
    max_classes = 1
    presets = {"cpu": "hetersam_cpu", "paper": "hetersam_paper"}
    ablations = {f"fusion-{f}": (f"method.options.fusion={f}",) for f in FUSIONS if f != "deformable_se"}
    benchmark_parts = ("latency", "cost")

    def __init__(self, backbone: Backbone, config: HeterSAMConfig, num_classes: int = 1):
        super().__init__(backbone, config, num_classes)
        if config.swin_preset is not None:
            for key, value in SWIN_PRESETS[config.swin_preset].items():
                setattr(config, key, value)
        backbone.freeze()
        grid = tuple(backbone.embed_grid)
        self.prompt_size = config.prompt_size or min(8 * grid[0], backbone.input_size)
        self.prompt_encoder = SwinUPromptEncoder(
            self.prompt_size, grid, backbone.embed_dim, config.embed_dim, config.depths, config.num_heads,
            config.window_size, config.patch_size, config.drop_path, config.decoder_act)
        self.fusion = None
        if config.fusion != "none":
            self.fusion = DeformableSEFusion(
                backbone.embed_dim, depth=config.fusion_depth, zero_init=config.fusion_zero_init,
                num_heads=config.fusion_heads, num_points=config.fusion_points, mlp_dim=config.fusion_mlp_dim,
                attention=config.fusion, downsample_rate=config.fusion_downsample, se_reduction=config.se_reduction,
                kv_grid=config.kv_grid, offset_init=config.offset_init)
        self.light_head = LightMaskHead(backbone.embed_dim, config.light_channels) if config.light_decoder else None
        self.light_phase = False  # the light head's own phase (last light_epochs epochs): everything else frozen

    def train(self, mode: bool = True) -> "HeterSAM":
        super().train(mode)
        self.backbone.eval()  # frozen SAM parts never switch to training behaviour
        if self.light_phase:  # the teacher keeps its BatchNorm statistics and drop-path off
            self.prompt_encoder.eval()
            if self.fusion is not None:
                self.fusion.eval()
        return self

    def on_epoch_start(self, epoch: int, num_epochs: int) -> None:
        self.light_phase = self.config.light_epochs > 0 and epoch >= num_epochs - self.config.light_epochs
        self.train(self.training)

    # --- the two halves of the forward pass --------------------------------------------------------------------
    def fused(self, batch: dict) -> tuple[Tensor, Tensor]:
        """(E' B x 256 x h x w, D B x 256 x h x w) for a batch."""
        if self.config.double_normalise:
            if "features" in batch:
                raise ConfigError("hetersam: double_normalise encodes the twice-normalised image, so cached "
                                  "embeddings do not apply; set data.cache=off")
            x = self.backbone.preprocess(batch["image"])
            with torch.no_grad():
                embedding = self.backbone.encode((x - self.backbone.pixel_mean) / self.backbone.pixel_std).embedding
        else:
            embedding = self.features(batch).embedding
        x = self.backbone.preprocess(batch["image"].to(embedding.dtype))
        if x.shape[-1] != self.prompt_size:
            x = F.interpolate(x, size=(self.prompt_size, self.prompt_size), mode="bilinear", align_corners=False)
        dense = self.prompt_encoder(x)
        if self.fusion is not None:
            embedding = self.fusion(embedding, dense, self.backbone.prompt_encoder.get_dense_pe())
        return embedding, dense

    def sam_decode(self, embedding: Tensor, dense: Tensor) -> Tensor:
        """Frozen mask decoder, no sparse prompt, single-mask output: B x 1 x 4h x 4w logits."""
        pe = self.backbone.prompt_encoder.get_dense_pe()
        sparse = empty_sparse(embedding.shape[0], embedding.shape[1], embedding)
        return decode_masks(self.backbone.mask_decoder, embedding, pe, sparse, dense).select(False)[0]

    def forward(self, batch: dict) -> dict[str, Tensor]:
        if self.light_phase:  # the light head alone; the full path is its (frozen) teacher
            with torch.no_grad():
                embedding, dense = self.fused(batch)
                logits = self.sam_decode(embedding, dense)
            return {"logits": logits, "dense": dense, "light_logits": self.light_head(embedding + dense)}
        embedding, dense = self.fused(batch)
        out = {"logits": self.sam_decode(embedding, dense), "dense": dense}
        if self.light_head is not None:
            src = embedding + dense
            out["light_logits"] = self.light_head(src.detach() if self.config.light_detach else src)
        return out

    # --- loss and inference ------------------------------------------------------------------------------------
    def _probs(self, logits: Tensor) -> Tensor:
        return minmax_normalise(logits) if self.config.faithful else torch.sigmoid(logits)

    def _bce(self, logits: Tensor, target: Tensor) -> Tensor:
        if self.config.faithful:
            return F.binary_cross_entropy(minmax_normalise(logits), target)
        return F.binary_cross_entropy_with_logits(logits, target)

    def _seg_loss(self, logits: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
        logits = logits.float()
        return self._bce(logits, target), soft_dice_loss(self._probs(logits), target)

    def loss(self, output: dict[str, Tensor], batch: dict) -> dict[str, Tensor]:
        """bce, dice (full path); with the light head light_bce, light_dice and light_distil (BCE towards the full
        path's detached probabilities); ``loss``: their weighted sum (the light terms only in the light phase)."""
        cfg = self.config
        target = (resize_labels(batch["label"], output["logits"].shape[-1]) > 0).float()[:, None]
        bce, dice = self._seg_loss(output["logits"], target)
        terms = {"bce": bce, "dice": dice, "loss": cfg.lambda_bce * bce + cfg.lambda_dice * dice}
        if "light_logits" in output:
            light = output["light_logits"].float()
            lbce, ldice = self._seg_loss(light, target)
            distil = self._bce(light, self._probs(output["logits"].detach().float()))
            light_loss = cfg.lambda_bce * lbce + cfg.lambda_dice * ldice + cfg.light_distil * distil
            terms.update(light_bce=lbce, light_dice=ldice, light_distil=distil)
            terms["loss"] = light_loss if self.light_phase else terms["loss"] + cfg.light_weight * light_loss
        return terms

    def predict(self, batch: dict, decoder: str | None = None) -> Tensor:
        """Probabilities B x 2 x S x S. ``decoder``: full | light (default: ``config.inference_decoder``)."""
        which = decoder or self.config.inference_decoder
        if which not in INFERENCE_DECODERS:
            raise ConfigError(f"hetersam: decoder must be one of {INFERENCE_DECODERS}, got {which!r}")
        embedding, dense = self.fused(batch)
        if which == "light":
            if self.light_head is None:
                raise ConfigError("hetersam: the light decoder was not trained (light_decoder=false)")
            logits = self.light_head(embedding + dense)
        else:
            logits = self.sam_decode(embedding, dense)
        p = self._probs(upsample_to(logits.float(), self.input_size))
        return torch.cat([1 - p, p], dim=1)
