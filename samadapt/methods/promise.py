"""ProMISe (arXiv 2403.04164): an Auto-Prompting Module (APM) plus Incremental Pattern Shifting (IPS), SAM frozen.

Every SAM weight stays frozen (image encoder, prompt encoder, mask decoder); the method uses the backbone's own
prompt encoder and mask decoder, and gradients flow *through* them to the two add-on modules:

- **APM** looks at the encoder's intermediate feature maps and outputs ``N_p`` point prompts (x, y) in the S x S
  input frame, with a fixed label pattern (default: first half positive, second half negative). By default each
  point is a bounded offset from an image-independent anchor grid (``point_param=anchor``, see ``PointHead``);
  ``point_param=global`` starts on the same grid but lets a point reach the whole image; ``point_param=sigmoid`` is
  the release's ``S * sigmoid``, whose points collapse onto the image border. The paper never supervises the
  points; ``point_loss_weight`` (ours, off by default) pulls them to their side of the ground truth. The points go
  into SAM's frozen prompt encoder, so the model stays promptable: a user can see the chosen points
  (``last_points``) and replace or extend them.
  Two variants: ``resnet`` (concatenated intermediates -> ``FeatureMap`` convs -> MONAI ResNet34 -> 2 N_p
  coordinates) and ``cross`` (N_p learned queries cross-attending over the multi-level intermediate maps).
- **IPS**: ``GAP(E) -> Linear -> GELU -> Linear`` gives per-image offsets B x 4 x 256 added to the frozen mask
  decoder's mask tokens (``decode_masks(..., mask_token_offsets=...)``).

Modes (``mode``): ``apm`` (APM only), ``apm_ips`` (both, the paper's ProMISe), ``ips_gt`` (IPS with points sampled
from the ground truth: N_p/2 foreground + N_p/2 background pixels, the paper's promptability test). The paper's
``APM_IPS_GT`` evaluation (train APM+IPS, evaluate with ground-truth points) is ``eval_points="gt"`` on an
``apm_ips`` model.

Output: mask token 1 of the frozen decoder (= channel 0 of SAM's multimask output, as the release uses), logits
B x 1 x 4h x 4w. Loss: BCE-with-logits + (1 - soft Dice), on logits (``faithful=True`` reproduces the release's
double sigmoid). Optional post-processing: morphological opening (``opening_kernel``, the paper uses 5).

Shapes below: B batch, S input size, h x w embedding grid, C_i intermediate widths, N_p points.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..backbones.base import Backbone, Features
from ..errors import ConfigError, InputError
from ..layers.sam_decoder import decode_masks
from . import METHODS
from .base import Method, MethodConfig, upsample_to
from .options import option
from .prompting import encode_prompts

MODES = ("apm", "apm_ips", "ips_gt")
POINT_PARAMS = ("anchor", "global", "sigmoid")


@dataclass
class ProMISeConfig(MethodConfig):
    mode: str = option("apm_ips", choices=MODES)
    """``apm`` | ``apm_ips`` | ``ips_gt`` (IPS with ground-truth points; no APM is built)."""
    apm: str = option("resnet", choices=("resnet", "cross"))
    """APM variant: ``resnet`` (FeatureMap + ResNet34) or ``cross`` (learned queries, cross-attention)."""
    num_points: int = option(16, ge=1)
    """N_p, points per image made by APM (and sampled from the ground truth in ``ips_gt``)."""
    point_labels: list[int] | str | None = None
    """Label pattern of the APM points (1 positive, 0 negative); a list or the release's ``"1-1-...-0"``
    string. Default: first half positive, second half negative."""
    feature_layers: str | list[int] = "late_stages"
    """Encoder layers the APM reads (``Backbone.resolve_layers``: a role or layer indices). ``late_stages`` = the
    release's blocks 6/9/12 on SAM ViT (indices 5, 8, 11: the last three global-attention blocks); on TinyViT
    (LiteMedSAM) stages 1, 2, 3. ``default`` gives the backbone's own choice (ViT-B 2, 5, 8)."""
    feature_channels: int = option(256, ge=1)
    """Width of the FeatureMap convs that reduce the concatenated intermediates (paper: 256)."""
    feature_grid: int | None = option(None, ge=1)
    """ResNet APM CPU cap: average-pool the concatenated intermediates to at most this grid side before the
    FeatureMap (None: the backbone's grid, as the paper). The points come from globally pooled ResNet features."""
    resnet_layers: list[int] = field(default_factory=lambda: [3, 4, 6, 3])
    """Blocks per ResNet stage (ResNet34: 3, 4, 6, 3)."""
    resnet_widths: list[int] = field(default_factory=lambda: [64, 128, 256, 512])
    """Channels per ResNet stage (ResNet34: 64, 128, 256, 512)."""
    cross_dim: int = 256
    """Cross-attention APM width (paper with ViT-B: 768; intermediates are projected to it by 1x1 convs)."""
    cross_heads: int = option(8, ge=1)
    """Attention heads of the cross-attention APM (paper: 12)."""
    cross_layers: int = option(1, ge=1)
    """Rounds over the memory levels (paper: 1 round = 3 layers cycling deepest -> shallowest)."""
    cross_upsample: bool = False
    """Upsample level l by ConvT2x2/s2 + Conv3x3 (no pad) + BN + ReLU, l times (paper: True, 64 -> 126 -> 250)."""
    cross_max_tokens: int | None = option(4096, ge=1)
    """CPU memory cap: average-pool each memory level to at most this many tokens (None: no cap)."""
    point_param: str = option("anchor", choices=POINT_PARAMS)
    """How APM's raw outputs become points (``PointHead``): ``anchor`` (a bounded offset from a fixed anchor grid,
    the head zero-initialised), ``global`` (starts on the same grid, may reach the whole image) or ``sigmoid`` (the
    release's ``S * sigmoid``, which collapses to the border)."""
    anchor_radius: float = option(0.4, gt=0, le=0.5)
    """``anchor``: how far a point may move from its anchor (each axis), as a fraction of the grid cell; 0.4 keeps
    the outer points 0.1 cell off the image border (0.5: the whole cell, up to the border)."""
    apm_lr_scale: float = option(1.0, ge=0)
    """APM learning rate = ``apm_lr_scale`` x the run's lr (paper: 1, one lr for APM and IPS). A high lr drives
    the coordinate sigmoid into saturation (all points stuck on the image border, the same for every image)."""
    ips_hidden: int = option(1024, ge=1)
    """Hidden width of the IPS feed-forward (paper: 1024)."""
    ips_zero_init: bool = False
    """Zero-init IPS's last layer so training starts from the frozen SAM tokens (paper: default init)."""
    eval_points: str = option("apm", choices=("apm", "gt"))
    """Points used outside training: ``apm`` or ``gt`` (sampled from ``batch["label"]``: the APM_IPS_GT test)."""
    user_points: str = option("replace", choices=("replace", "extend"))
    """User points (``batch["points"]``) ``replace`` the automatic points or ``extend`` them."""
    gt_point_seed: int = 0
    """Seed of the ground-truth point sampler outside training (reproducible evaluation)."""
    output_token: int = option(1, ge=0)
    """Mask token used as output (1 = SAM's first multimask output, as the release)."""
    lambda_bce: float = option(1.0, ge=0)
    lambda_dice: float = option(1.0, ge=0)
    dice_smooth: float = option(1.0, ge=0)
    point_loss_weight: float = option(0.0, ge=0)
    """Ours, not the paper's (which never supervises the coordinates): weight of ``point_distance_loss``, which
    pulls each positive APM point towards the foreground and each negative one towards the background. 0 = the
    paper."""
    faithful: bool = False
    """Reproduce the release's double sigmoid in the loss (the loss sees sigmoid(logits) as logits)."""
    opening_kernel: int = option(0, ge=0)
    """Morphological opening (k x k square) of the thresholded mask at prediction; 0 = off (paper: 5)."""

    def check(self) -> None:
        parse_point_labels(self.point_labels, self.num_points)
        if self.point_loss_weight > 0 and self.mode == "ips_gt":
            raise ConfigError("method.options.point_loss_weight needs the APM's points; mode 'ips_gt' has no APM")


def parse_point_labels(spec: Sequence[int] | str | None, num_points: int) -> list[int]:
    """The APM label pattern: ``None`` -> first half 1, second half 0; ``"1-1-0-0"`` or a list otherwise."""
    if spec is None:
        half = (num_points + 1) // 2
        return [1] * half + [0] * (num_points - half)
    values = [int(v) for v in spec.split("-")] if isinstance(spec, str) else [int(v) for v in spec]
    if len(values) != num_points or any(v not in (0, 1) for v in values):
        raise ConfigError(f"point_labels must hold {num_points} values of 0/1, got {spec!r}")
    return values


# --- APM: from raw outputs to points ---------------------------------------------------------------------------
def anchor_grid(labels: Sequence[int], size: int) -> Tensor:
    """Image-independent anchors N x 2 (x, y): the cell centres of a g x g grid over the S x S frame
    (g = ceil(sqrt(N))), positive points on one checkerboard colour and negative ones on the other, so that both
    kinds cover the whole image whatever the label order (row-major cells, positives from the front of the
    colour-sorted list, negatives from its back)."""
    n = len(labels)
    g = math.ceil(math.sqrt(n))
    cells = sorted(range(g * g), key=lambda c: ((c // g + c % g) % 2, c))
    pos = iter(cells)
    neg = iter(reversed(cells))
    chosen = [next(pos) if lab == 1 else next(neg) for lab in labels]
    step = size / g
    return torch.tensor([[(c % g + 0.5) * step, (c // g + 0.5) * step] for c in chosen], dtype=torch.float32)


class PointHead(nn.Module):
    """The APM's coordinate head: features B x [N x] D -> points B x N x 2 (x, y) in the S x S frame.

    ``out_features`` is 2 N for one vector per image (ResNet APM) or 2 for one vector per point (cross APM). By
    ``kind``:

    - ``sigmoid`` (the release): ``S * sigmoid(Linear(f))``. Every point can go anywhere, and nothing but the
      decoder's gradient keeps it off the border. Adam moves each of the D head weights by about the lr per step,
      so the logits move by about ``lr * sum_j |f_j|`` (D = 512 pooled ResNet features): within a few steps they
      reach the sigmoid's flat tails, where ``d point / d logit = S sigmoid'`` vanishes, and the points sit on
      the image edges, the same for every image (measured: ``benchmarks/promise_apm_probe.py``).
    - ``anchor``: ``a + r * tanh(Linear(LN(f)) / sqrt(D))``. ``a`` = ``anchor_grid`` (fixed, not trained),
      ``r = radius * S / g`` (radius 0.4: each point moves within its own grid cell and keeps 0.1 cell off the
      image border; no two points can meet). LayerNorm (no affine) and ``1 / sqrt(D)`` make an Adam step move the
      offsets by about ``lr * sqrt(D)`` whatever the feature scale, far from saturation; the zero-initialised
      Linear starts every image on the grid.
    - ``global``: ``S/2 + S/2 * tanh(atanh(2a/S - 1) + Linear(LN(f)) / sqrt(D))``: the same start on the grid
      and the same step size, but the offset is added before one tanh over the whole frame, so a point can reach
      any pixel (never the border itself) instead of staying in its cell; for ``point_loss_weight``, whose pull
      may lead far from a point's anchor.
    """

    def __init__(self, in_features: int, out_features: int, labels: Sequence[int], size: int, kind: str = "anchor",
                 radius: float = 0.4):
        super().__init__()
        self.kind, self.size, self.num_points = kind, size, len(labels)
        scaled = kind in ("anchor", "global")
        self.norm = nn.LayerNorm(in_features, elementwise_affine=False) if scaled else nn.Identity()
        self.linear = nn.Linear(in_features, out_features)
        self.gain = in_features ** -0.5 if scaled else 1.0
        if scaled:
            nn.init.zeros_(self.linear.weight)
            nn.init.zeros_(self.linear.bias)
        self.register_buffer("anchors", anchor_grid(labels, size), persistent=False)
        self.radius = radius * size / math.ceil(math.sqrt(len(labels)))

    def forward(self, features: Tensor) -> Tensor:
        raw = (self.linear(self.norm(features)) * self.gain).view(features.shape[0], self.num_points, 2)
        if self.kind == "sigmoid":
            return self.size * torch.sigmoid(raw)
        if self.kind == "global":
            half = self.size / 2
            return half + half * torch.tanh(torch.atanh(self.anchors / half - 1) + raw)
        return self.anchors + self.radius * torch.tanh(raw)


# --- APM: ResNet variant ---------------------------------------------------------------------------------------
def concat_intermediates(maps: Sequence[Tensor]) -> Tensor:
    """Concatenate intermediate maps, deepest first (the release's ``cat(f12, f9, f6)``), on one grid.

    maps: NCHW B x C_i x h_i x w_i (shallow -> deep, the backbone's order); maps on a smaller grid are resized
    bilinearly to the largest one. Returns B x sum(C_i) x h x w.
    """
    if not maps:
        raise ConfigError("ProMISe's APM needs the backbone's intermediate feature maps (none were given)")
    h = max(m.shape[-2] for m in maps)
    w = max(m.shape[-1] for m in maps)
    out = [m if m.shape[-2:] == (h, w) else F.interpolate(m, size=(h, w), mode="bilinear", align_corners=False)
           for m in reversed(list(maps))]
    return torch.cat(out, dim=1)


class FeatureMap(nn.Sequential):
    """The release's ``FeatureMap``: Conv3x3(C_in -> C) + ReLU, Conv3x3(C -> C) + ReLU, Conv3x3(C -> C).

    B x C_in x h x w -> B x C x h x w.
    """

    def __init__(self, in_channels: int, channels: int = 256):
        super().__init__(
            nn.Conv2d(in_channels, channels, 3, padding=1), nn.ReLU(inplace=True),
            nn.Conv2d(channels, channels, 3, padding=1), nn.ReLU(inplace=True),
            nn.Conv2d(channels, channels, 3, padding=1),
        )


class APMResNet(nn.Module):
    """ResNet APM: intermediates (optionally average-pooled to ``grid``) -> FeatureMap -> MONAI ResNet (3x3
    stride-1 stem, max-pool, 4 stages, GAP) -> 512 pooled features -> ``PointHead`` (the release's fc):
    B x N_p x 2 (x, y) in the S x S frame."""

    def __init__(self, in_channels: int, labels: Sequence[int], input_size: int, feature_channels: int = 256,
                 layers: Sequence[int] = (3, 4, 6, 3), widths: Sequence[int] = (64, 128, 256, 512),
                 grid: int | None = None, point_param: str = "anchor", radius: float = 0.4):
        super().__init__()
        from monai.networks.nets import ResNet

        self.grid = grid
        self.feature_map = FeatureMap(in_channels, feature_channels)
        self.resnet = ResNet(block="basic", layers=list(layers), block_inplanes=list(widths), spatial_dims=2,
                             n_input_channels=feature_channels, conv1_t_size=3, conv1_t_stride=1,
                             shortcut_type="B", feed_forward=False)
        self.head = PointHead(list(widths)[-1], 2 * len(labels), labels, input_size, point_param, radius)

    def forward(self, features: Features) -> Tensor:
        x = concat_intermediates(features.intermediates)  # B x sum(C_i) x h x w
        if self.grid is not None and max(x.shape[-2:]) > self.grid:
            f = math.ceil(max(x.shape[-2:]) / self.grid)
            x = F.avg_pool2d(x, f, ceil_mode=True)
        x = self.feature_map(x)  # B x C x h' x w'
        return self.head(self.resnet(x))  # B x 512 -> B x N_p x 2


# --- APM: cross-attention variant ------------------------------------------------------------------------------
def sine_position_encoding(h: int, w: int, dim: int, like: Tensor, temperature: float = 10000.0) -> Tensor:
    """DETR's normalised 2D sine encoding: 1 x (h*w) x dim (dim/2 channels for y, then dim/2 for x)."""
    if dim % 4:
        raise ConfigError(f"cross_dim must be a multiple of 4 for the sine position encoding, got {dim}")
    eps, scale = 1e-6, 2 * math.pi
    y = (torch.arange(1, h + 1, device=like.device, dtype=like.dtype) / (h + eps) * scale)[:, None].expand(h, w)
    x = (torch.arange(1, w + 1, device=like.device, dtype=like.dtype) / (w + eps) * scale)[None, :].expand(h, w)
    half = dim // 2
    t = torch.arange(half, device=like.device, dtype=like.dtype)
    t = temperature ** (2 * torch.div(t, 2, rounding_mode="floor") / half)
    py, px = y[..., None] / t, x[..., None] / t  # h x w x half

    def interleave(p: Tensor) -> Tensor:
        return torch.stack([p[..., 0::2].sin(), p[..., 1::2].cos()], dim=-1).flatten(-2)

    return torch.cat([interleave(py), interleave(px)], dim=-1).reshape(1, h * w, dim)


class UpBlock(nn.Sequential):
    """The release's level upsampler: ConvT2x2/s2 + Conv3x3 (no padding) + BN + ReLU; h -> 2h - 2."""

    def __init__(self, dim: int):
        super().__init__(nn.ConvTranspose2d(dim, dim, 2, stride=2), nn.Conv2d(dim, dim, 3),
                         nn.BatchNorm2d(dim), nn.ReLU(inplace=True))


class CrossAttentionLayer(nn.Module):
    """``x = LN(x + MHA(x + q_pe, src + pe, src)); x = LN(x + FFN(x))`` (no query self-attention)."""

    def __init__(self, dim: int, heads: int, ffn: int):
        super().__init__()
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.norm1 = nn.LayerNorm(dim)
        self.ffn = nn.Sequential(nn.Linear(dim, ffn), nn.ReLU(inplace=True), nn.Linear(ffn, dim))
        self.norm2 = nn.LayerNorm(dim)

    def forward(self, x: Tensor, query_pe: Tensor, src: Tensor, pe: Tensor) -> Tensor:
        """x, query_pe: B x N_p x D; src: B x T x D; pe: 1 x T x D -> B x N_p x D."""
        attended, _ = self.attn(x + query_pe, src + pe, src, need_weights=False)
        x = self.norm1(x + attended)
        return self.norm2(x + self.ffn(x))


class APMCross(nn.Module):
    """Cross-attention APM: N_p learned queries attend over the intermediate maps, deepest level first, cycling
    the levels for ``rounds`` rounds; a ``PointHead`` (the release's ``Linear(D -> 2)``) gives B x N_p x 2 (x, y).

    Each level: 1x1 projection C_i -> D (identity when C_i == D), optional upsampling (level l by l UpBlocks, the
    release's 64 -> 126 -> 250 memory), optional average pooling to at most ``max_tokens`` tokens (CPU cap),
    plus a learned level embedding and the 2D sine position encoding.
    """

    def __init__(self, widths: Sequence[int], labels: Sequence[int], input_size: int, dim: int = 256,
                 heads: int = 8, rounds: int = 1, upsample: bool = False, max_tokens: int | None = 4096,
                 point_param: str = "anchor", radius: float = 0.4):
        super().__init__()
        if dim % heads:
            raise ConfigError(f"cross_dim {dim} must be divisible by cross_heads {heads}")
        num_points = len(labels)
        self.max_tokens = max_tokens
        levels = list(reversed(list(widths)))  # deepest first
        self.proj = nn.ModuleList(nn.Identity() if c == dim else nn.Conv2d(c, dim, 1) for c in levels)
        self.up = nn.ModuleList(nn.Sequential(*[UpBlock(dim) for _ in range(level if upsample else 0)])
                                for level in range(len(levels)))
        self.level_embed = nn.Parameter(torch.zeros(len(levels), dim))
        self.query_feat = nn.Parameter(torch.zeros(num_points, dim))
        self.query_pe = nn.Parameter(torch.zeros(num_points, dim))
        for p in (self.level_embed, self.query_feat, self.query_pe):
            nn.init.normal_(p, std=0.02)
        self.layers = nn.ModuleList(CrossAttentionLayer(dim, heads, 4 * dim) for _ in range(rounds * len(levels)))
        self.head = PointHead(dim, 2, labels, input_size, point_param, radius)

    def _memory(self, maps: Sequence[Tensor]) -> list[tuple[Tensor, Tensor]]:
        """Per level (deepest first): tokens B x T_l x D (with level embedding) and position encoding 1 x T_l x D."""
        out = []
        for level, m in enumerate(reversed(list(maps))):
            x = self.up[level](self.proj[level](m))
            h, w = x.shape[-2:]
            if self.max_tokens is not None and h * w > self.max_tokens:
                f = math.ceil(math.sqrt(h * w / self.max_tokens))
                x = F.adaptive_avg_pool2d(x, (max(h // f, 1), max(w // f, 1)))
                h, w = x.shape[-2:]
            tokens = x.flatten(2).transpose(1, 2) + self.level_embed[level]
            out.append((tokens, sine_position_encoding(h, w, tokens.shape[-1], tokens)))
        return out

    def forward(self, features: Features) -> Tensor:
        maps = features.intermediates
        if len(maps) != len(self.proj):
            raise ConfigError(f"cross-attention APM was built for {len(self.proj)} intermediate maps, got {len(maps)}")
        memory = self._memory(maps)
        b = maps[0].shape[0]
        x = self.query_feat.unsqueeze(0).expand(b, -1, -1)
        qpe = self.query_pe.unsqueeze(0).expand(b, -1, -1)
        for i, layer in enumerate(self.layers):
            src, pe = memory[i % len(memory)]
            x = layer(x, qpe, src, pe)
        return self.head(x)  # B x N_p x 2


# --- IPS --------------------------------------------------------------------------------------------------------
class IPS(nn.Module):
    """Incremental Pattern Shifting: ``GAP(E) -> Linear(C -> H) -> GELU -> Linear(H -> M*C)`` -> B x M x C offsets
    for the M mask tokens of the frozen decoder (E: B x C x h x w)."""

    def __init__(self, dim: int = 256, num_tokens: int = 4, hidden: int = 1024, zero_init: bool = False):
        super().__init__()
        self.num_tokens, self.dim = num_tokens, dim
        self.ffn = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, num_tokens * dim))
        if zero_init:
            nn.init.zeros_(self.ffn[-1].weight)
            nn.init.zeros_(self.ffn[-1].bias)

    def forward(self, embedding: Tensor) -> Tensor:
        pooled = embedding.mean(dim=(-2, -1))  # B x C
        return self.ffn(pooled).view(-1, self.num_tokens, self.dim)


# --- helpers ----------------------------------------------------------------------------------------------------
def sample_gt_points(labels: Tensor, num_points: int, generator: torch.Generator | None = None
                     ) -> tuple[Tensor, Tensor]:
    """Random prompt points from ground truth (SAM-Med2D's ``init_point_sampling``, batched).

    labels: B x H x W (foreground = label > 0). Draws ``num_points // 2`` foreground and the rest background
    pixels per image, with replacement; an image without foreground (or background) gets all its points from the
    other side, with the matching labels. Returns coords B x N x 2 (x, y) float pixel indices, labels B x N.
    """
    b, h, w = labels.shape
    fg = (labels > 0).reshape(b, -1).float()
    bg = 1.0 - fg
    n_fg = num_points // 2
    has_fg, has_bg = fg.sum(1) > 0, bg.sum(1) > 0
    # Rows lacking one side draw from the other one instead.
    fg_w = torch.where(has_fg[:, None], fg, bg)
    bg_w = torch.where(has_bg[:, None], bg, fg)
    idx_fg = torch.multinomial(fg_w, n_fg, replacement=True, generator=generator) if n_fg else fg.new_zeros(b, 0).long()
    idx_bg = torch.multinomial(bg_w, num_points - n_fg, replacement=True, generator=generator)
    idx = torch.cat([idx_fg, idx_bg], dim=1)
    point_labels = torch.cat([has_fg[:, None].expand(b, n_fg).long(),
                              (~has_bg[:, None]).expand(b, num_points - n_fg).long()], dim=1)
    coords = torch.stack([idx % w, torch.div(idx, w, rounding_mode="floor")], dim=-1).float()
    return coords, point_labels


def distance_maps(labels: Tensor, grid: int = 256) -> Tensor:
    """Per image, how far each pixel is from the foreground and from the background, in units of the image side.

    labels: B x H x W (foreground = label > 0), resized (nearest) to at most ``grid`` on its longer side first.
    Returns B x 2 x h x w float: channel 0 the Euclidean distance to the nearest foreground pixel (0 on it),
    channel 1 to the nearest background pixel (0 on it); a channel whose side is missing from the image is all 0.
    """
    from scipy.ndimage import distance_transform_edt

    fg = (labels > 0).float()[:, None]
    if max(fg.shape[-2:]) > grid:
        fg = F.interpolate(fg, scale_factor=grid / max(fg.shape[-2:]), mode="nearest")
    fg_np = fg[:, 0].cpu().numpy() > 0.5
    side = max(fg_np.shape[-2:])
    out = torch.zeros(fg_np.shape[0], 2, *fg_np.shape[-2:])
    for i, m in enumerate(fg_np):
        for c, present in enumerate((m, ~m)):
            if present.any() and not present.all():
                out[i, c] = torch.from_numpy(distance_transform_edt(~present) / side)
    return out.to(labels.device)


def point_distance_loss(points: Tensor, point_labels: Tensor, labels: Tensor, size: int) -> Tensor:
    """Mean distance from each point to the side its label names (positive -> foreground, negative ->
    background), read bilinearly from ``distance_maps`` so that its gradient points at the nearest such pixel.

    points: B x N x 2 (x, y) in the S x S frame (pixel indices, S = ``size``); point_labels: B x N (1/0);
    labels: B x H x W ground truth of that frame. Returns a scalar in units of the image side (0: every point
    on its side).
    """
    maps = distance_maps(labels).to(points.dtype)  # B x 2 x h x w
    grid = ((points + 0.5) / size * 2 - 1).unsqueeze(2)  # B x N x 1 x 2 in [-1, 1] (pixel centres)
    sampled = F.grid_sample(maps, grid, mode="bilinear", padding_mode="border", align_corners=False)[..., 0]
    own = torch.where(point_labels.bool(), sampled[:, 0], sampled[:, 1])  # B x N
    return own.mean()


def binary_opening(mask: Tensor, kernel: int) -> Tensor:
    """Morphological opening (erosion then dilation) with a k x k square, by max-pooling: B x 1 x H x W bool."""
    if kernel <= 1:
        return mask
    x = mask.float()
    pad_lo, pad_hi = (kernel - 1) // 2, kernel // 2
    padded = F.pad(-x, (pad_lo, pad_hi, pad_lo, pad_hi), value=-1.0)  # outside counts as foreground for erosion
    eroded = -F.max_pool2d(padded, kernel, stride=1)
    dilated = F.max_pool2d(F.pad(eroded, (pad_hi, pad_lo, pad_hi, pad_lo), value=0.0), kernel, stride=1)
    return dilated > 0.5


def bce_dice_loss(logits: Tensor, target: Tensor, smooth: float = 1.0, lambda_bce: float = 1.0,
                  lambda_dice: float = 1.0) -> tuple[Tensor, Tensor]:
    """The release's BCEDiceLoss on logits: BCE-with-logits and 1 - soft Dice (per image, smoothed, averaged).

    logits, target: B x 1 x h x w (target in [0, 1]). Returns (lambda_bce * bce, lambda_dice * dice_loss).
    """
    bce = F.binary_cross_entropy_with_logits(logits, target)
    p = torch.sigmoid(logits).flatten(1)
    t = target.flatten(1)
    dice = (2 * (p * t).sum(1) + smooth) / (p.sum(1) + t.sum(1) + smooth)
    return lambda_bce * bce, lambda_dice * (1 - dice.mean())


# --- the method -------------------------------------------------------------------------------------------------
@METHODS.register
class ProMISe(Method):
    """ProMISe on any SAM-family backbone, all SAM weights frozen.

    ``forward(batch)`` -> ``{"logits": B x 1 x 4h x 4w, "points": B x N x 2, "point_labels": B x N}`` (points in
    the S x S frame). ``predict(batch)`` -> probabilities B x 2 x S x S and sets ``last_points`` /
    ``last_point_labels`` / ``last_point_source`` to the prompts it used. User prompts: ``batch["points"]``
    B x N_u x 2 (x, y) with ``batch["point_labels"]`` B x N_u (1/0/-1).
    """

    name = "promise"
    config_class = ProMISeConfig
    needs_encoder_grad = False
    needs_intermediates = True
    max_classes = 1
    promptable = True
    prompt_kinds = ("points",)
    presets = {"cpu": "promise_cpu", "paper": "promise_paper"}
    ablations = {"apm-resnet": ("method.options.mode=apm",),  # the paper's five variants; this is APM_IPS_resnet
                 "apm-cross": ("method.options.mode=apm", "method.options.apm=cross"),
                 "apm-ips-cross": ("method.options.apm=cross",), "ips-gt": ("method.options.mode=ips_gt",)}
    benchmark_parts = ("latency", "cost")
    frozen_prompts = ("points",)  # the APM's points steer the frozen decoder; LiteMedSAM's was trained with boxes
    export_refusal = ("its automatic point prompts are traced with a fixed batch size; ONNX Runtime fails on another "
                      "batch size in the prompt encoder")
    split_export = True  # the frozen encoder (embedding + APM's maps) is one graph; APM -> prompts -> decoder in Python

    def __init__(self, backbone: Backbone, config: ProMISeConfig, num_classes: int = 1):
        super().__init__(backbone, config, num_classes)
        m = backbone.mask_decoder.num_mask_tokens
        if config.output_token >= m:
            raise ConfigError(f"method.options.output_token={config.output_token} is out of range: expected < {m} "
                              f"(the mask decoder's {m} mask tokens)")
        backbone.freeze()  # every SAM weight frozen; gradients still flow through the modules to APM/IPS
        self.backbone.eval()
        self.register_buffer("apm_labels", torch.tensor(parse_point_labels(config.point_labels, config.num_points)),
                             persistent=False)
        self.apm: nn.Module | None = None
        self.feature_layers = backbone.resolve_layers(config.feature_layers) if config.mode != "ips_gt" else ()
        if config.mode != "ips_gt":
            widths = backbone.widths_of(self.feature_layers)
            labels = self.apm_labels.tolist()
            if config.apm == "resnet":
                self.apm = APMResNet(sum(widths), labels, backbone.input_size, config.feature_channels,
                                     config.resnet_layers, config.resnet_widths, config.feature_grid,
                                     config.point_param, config.anchor_radius)
            else:
                self.apm = APMCross(widths, labels, backbone.input_size, config.cross_dim, config.cross_heads,
                                    config.cross_layers, config.cross_upsample, config.cross_max_tokens,
                                    config.point_param, config.anchor_radius)
        self.ips = IPS(backbone.embed_dim, m, config.ips_hidden, config.ips_zero_init) \
            if config.mode in ("apm_ips", "ips_gt") else None
        self.last_points: Tensor | None = None
        self.last_point_labels: Tensor | None = None
        self.last_point_source: str | None = None
        self._source: str | None = None  # where the last forward's points came from (apm, gt, user, ...)

    @property
    def intermediates(self) -> tuple[int, ...]:
        """The encoder layers APM reads (``feature_layers`` resolved on the backbone; none in ``ips_gt``)."""
        return self.feature_layers

    def param_groups(self, lr: float) -> list[dict]:
        """APM at ``apm_lr_scale * lr``, IPS at ``lr``."""
        groups = []
        if self.apm is not None:
            groups.append({"params": list(self.apm.parameters()), "lr": lr * self.config.apm_lr_scale})
        if self.ips is not None:
            groups.append({"params": list(self.ips.parameters()), "lr": lr})
        return groups

    def train(self, mode: bool = True) -> "ProMISe":
        """Train/eval the add-on modules; the frozen backbone always stays in eval mode (no BN statistics drift)."""
        super().train(mode)
        self.backbone.eval()
        return self

    # --- prompts --------------------------------------------------------------------------------------------
    def _gt_points(self, batch: dict, device: torch.device) -> tuple[Tensor, Tensor]:
        if "label" not in batch:
            raise InputError("promise", "ground-truth points were requested (mode ips_gt or eval_points=gt) but the "
                                        "batch has no 'label'; pass batch['points'] and batch['point_labels'] instead")
        generator = None
        if not self.training:
            generator = torch.Generator(device=batch["label"].device).manual_seed(self.config.gt_point_seed)
        coords, labels = sample_gt_points(batch["label"], self.config.num_points, generator)
        return coords.to(device), labels.to(device)

    def apm_points(self, features: Features) -> tuple[Tensor, Tensor]:
        """APM's points B x N_p x 2 (x, y in the S x S frame) and their fixed labels B x N_p."""
        if self.apm is None:
            raise ConfigError("mode 'ips_gt' has no APM")
        coords = self.apm(features)
        return coords, self.apm_labels.unsqueeze(0).expand(coords.shape[0], -1)

    def choose_points(self, batch: dict, features: Features) -> tuple[Tensor, Tensor, str]:
        """The prompts for this batch: (coords B x N x 2, labels B x N, source) by mode, phase and user input."""
        device = features.embedding.device
        user = None
        if batch.get("points") is not None:
            if batch.get("point_labels") is None:
                raise InputError("promise", "batch['points'] given without batch['point_labels']")
            user = (batch["points"].to(device=device, dtype=features.embedding.dtype),
                    batch["point_labels"].to(device=device).long())
        if self.config.mode == "ips_gt":
            if user is not None:
                return user[0], user[1], "user"
            return (*self._gt_points(batch, device), "gt")
        if user is not None and self.config.user_points == "replace":
            return user[0], user[1], "user"
        if not self.training and self.config.eval_points == "gt":
            coords, labels = self._gt_points(batch, device)
            source = "gt"
        else:
            coords, labels = self.apm_points(features)
            source = "apm"
        if user is not None:  # extend
            return torch.cat([coords, user[0]], dim=1), torch.cat([labels, user[1]], dim=1), f"{source}+user"
        return coords, labels, source

    # --- the Method interface ---------------------------------------------------------------------------------
    def forward(self, batch: dict) -> dict[str, Tensor]:
        features = self.features(batch)
        embedding = features.embedding  # B x C x h x w
        coords, labels, source = self.choose_points(batch, features)
        self._source = source
        sparse, dense = encode_prompts(self.backbone, points=(coords, labels))  # B x (N+1) x C, B x C x h x w
        offsets = self.ips(embedding) if self.ips is not None else None  # B x M x C
        pe = self.backbone.prompt_encoder.get_dense_pe()
        out = decode_masks(self.backbone.mask_decoder, embedding, pe, sparse, dense, mask_token_offsets=offsets)
        k = self.config.output_token
        return {"logits": out.masks[:, k:k + 1], "points": coords, "point_labels": labels}

    def loss(self, output: dict[str, Tensor], batch: dict) -> dict[str, Tensor]:
        logits = output["logits"]  # B x 1 x h x w
        target = (batch["label"] > 0).float()[:, None]
        if target.shape[-2:] != logits.shape[-2:]:  # the release resizes the ground truth bilinearly
            target = F.interpolate(target, size=logits.shape[-2:], mode="bilinear", align_corners=False)
        z = torch.sigmoid(logits) if self.config.faithful else logits
        bce, dice = bce_dice_loss(z, target, self.config.dice_smooth, self.config.lambda_bce, self.config.lambda_dice)
        terms = {"loss": bce + dice, "bce": bce.detach(), "dice": dice.detach()}
        if self.config.point_loss_weight > 0 and self._source == "apm":
            points = self.config.point_loss_weight * point_distance_loss(
                output["points"], output["point_labels"], batch["label"], self.input_size)
            terms.update(loss=terms["loss"] + points, points=points.detach())
        return terms

    def predict(self, batch: dict) -> Tensor:
        """Probabilities B x 2 x S x S; ``last_points`` (B x N x 2, S x S frame) and ``last_point_labels`` (B x N)
        keep the prompts used, ``last_point_source`` says where they came from (apm, gt, user, apm+user...)."""
        with torch.no_grad():
            out = self.forward(batch)
        self.last_points = out["points"].detach()
        self.last_point_labels = out["point_labels"].detach()
        self.last_point_source = self._source
        logits = out["logits"]
        if self.config.opening_kernel > 1:
            p = torch.sigmoid(logits)
            p = p * binary_opening(p > 0.5, self.config.opening_kernel)
            p = upsample_to(p, self.input_size).clamp(0, 1)
        else:
            p = torch.sigmoid(upsample_to(logits, self.input_size))
        return torch.cat([1 - p, p], dim=1)
