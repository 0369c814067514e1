"""Deformable two-way cross-attention with an SE gate on the values (HeterSAM, METHODS.md 1.4, the design marked
[ours]); plain PyTorch, bilinear ``F.grid_sample``, no custom CUDA op.

Building blocks:

- :func:`deformable_sample`: the sampling core (the math of Deformable-DETR's ``ms_deform_attn_core_pytorch`` for one
  level). ``value`` B x H x Ch x h x w, ``locations`` B x Nq x H x K x 2 (x, y) in [0, 1] image fractions,
  ``weights`` B x Nq x H x K -> B x Nq x (H * Ch), ``out_h = sum_k A_{h,k} * bilinear(V_h, loc_{h,k})``.
  Fraction (0, 0) is the top-left image *corner* and pixel ``j``'s centre is at ``(j + 0.5) / w``
  (``align_corners=False``); locations outside the map read zeros.
- :class:`ValueSEGate`: ``V <- V * sigmoid(W2 relu(W1 mean_tokens(V)))`` with W1: C -> C / r, W2: C / r -> C (biases), the
  channel gate of the released (unused) ``DeformableAttention``; on a B x N x C token tensor.
- :class:`DeformableAttention`: queries B x Nq x C with reference points B x Nq x 2 attend to a value map
  B x C x h x w. Offsets ``Linear(q) -> H*K*2`` (pixels of the value map) and weights ``softmax_k(Linear(q) -> H*K)``;
  value projection C -> C / downsample, SE gate, per-head sampling, output projection back to C. Both Linear
  layers start with zero weights (weights uniform over the K points). ``offset_init="ring"`` (default,
  Deformable-DETR style) sets the offset bias so that head h looks along its own direction
  ``2 pi h / H`` and point k sits k + 1 pixels out on it: the K points of a head start apart, so they receive
  different gradients and learn different offsets and weights. ``offset_init="zero"`` (METHODS.md 1.4 read
  literally: every point at the reference) is symmetric: the K points of a head get identical gradients and stay
  identical under any optimiser, i.e. K copies of one point; it is kept as an ablation only.
- :class:`SEAttention`: the released attention (full multi-head softmax attention, SE gate on V), SAM layout.
- :class:`DeformableTwoWayBlock`: SAM's ``TwoWayAttentionBlock`` layout between a dense *query* map (the prompt
  stream) and a dense *key* map (the image stream), each sub-layer followed by residual + LayerNorm exactly as in
  SAM: self-attention on the queries (norm1) -> query-to-key cross-attention (norm2) -> MLP (norm3) ->
  key-to-query cross-attention (norm4). ``attention="deformable_se"`` uses :class:`DeformableAttention` everywhere
  (each grid position's reference is its own location); ``attention="se"`` uses :class:`SEAttention` with keys and
  values average-pooled to at most ``kv_grid`` x ``kv_grid`` (full attention over a 64 x 64 grid would hold a
  4096 x 4096 map per head).
- :class:`DeformableSEFusion`: ``E' = E + Z(block(D, E))``: the fusion adapter placed before a frozen SAM mask
  decoder (image embedding E and dense prompt D, both B x C x h x w). ``Z`` is a zero-initialised linear map, so at
  initialisation ``E' = E`` exactly and the frozen decoder starts from its pretrained operating point.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import ConfigError

ATTENTIONS = ("se", "deformable_se")
OFFSET_INITS = ("ring", "zero")


def grid_reference(h: int, w: int, batch: int, like: Tensor) -> Tensor:
    """Reference points of every position of an h x w grid (pixel centres), row-major: B x (h*w) x 2 (x, y) in [0, 1]."""
    ys = (torch.arange(h, device=like.device, dtype=like.dtype) + 0.5) / h
    xs = (torch.arange(w, device=like.device, dtype=like.dtype) + 0.5) / w
    ref = torch.stack(torch.meshgrid(xs, ys, indexing="xy"), dim=-1).reshape(1, h * w, 2)
    return ref.expand(batch, -1, -1)


def deformable_sample(value: Tensor, locations: Tensor, weights: Tensor) -> Tensor:
    """Weighted bilinear sampling per head.

    value: B x H x Ch x h x w; locations: B x Nq x H x K x 2 (x, y) in [0, 1] fractions of the map;
    weights: B x Nq x H x K. Returns B x Nq x (H * Ch), heads concatenated.
    """
    b, heads, ch, h, w = value.shape
    nq, k = locations.shape[1], locations.shape[3]
    grid = (2.0 * locations - 1.0).to(value.dtype)  # [0, 1] -> [-1, 1] (align_corners=False)
    grid = grid.permute(0, 2, 1, 3, 4).reshape(b * heads, nq, k, 2)
    sampled = F.grid_sample(value.reshape(b * heads, ch, h, w), grid, mode="bilinear", padding_mode="zeros",
                            align_corners=False)  # (B*H) x Ch x Nq x K
    a = weights.permute(0, 2, 1, 3).reshape(b * heads, 1, nq, k).to(sampled.dtype)
    out = (sampled * a).sum(dim=-1)  # (B*H) x Ch x Nq
    return out.reshape(b, heads * ch, nq).transpose(1, 2)


class ValueSEGate(nn.Module):
    """Channel SE gate over tokens: B x N x C -> B x N x C, ``x * sigmoid(W2 relu(W1 mean_N(x)))``."""

    def __init__(self, channels: int, reduction: int = 4):
        super().__init__()
        hidden = max(1, channels // reduction)
        self.fc1 = nn.Linear(channels, hidden)
        self.fc2 = nn.Linear(hidden, channels)

    def forward(self, x: Tensor) -> Tensor:
        gate = torch.sigmoid(self.fc2(torch.relu(self.fc1(x.mean(dim=1)))))  # B x C
        return x * gate.unsqueeze(1)


class DeformableAttention(nn.Module):
    """Deformable attention with an SE-gated value (one level).

    query: B x Nq x C (content + positional encoding), reference: B x Nq x 2 (x, y) in [0, 1],
    value: B x C x h x w -> B x Nq x C. ``downsample_rate`` shrinks the internal width as SAM's cross-attention
    does (256 -> 128 with 2); offsets are in pixels of the value map.
    """

    def __init__(self, dim: int, num_heads: int = 8, num_points: int = 4, downsample_rate: int = 1,
                 se_reduction: int | None = 4, offset_init: str = "ring"):
        super().__init__()
        internal = dim // downsample_rate
        if internal % num_heads:
            raise ConfigError(f"deformable attention: internal width {internal} not divisible by {num_heads} heads")
        if offset_init not in OFFSET_INITS:
            raise ConfigError(f"offset_init must be one of {OFFSET_INITS}, got {offset_init!r}")
        self.dim, self.internal, self.num_heads, self.num_points = dim, internal, num_heads, num_points
        self.value_proj = nn.Linear(dim, internal)
        self.se = ValueSEGate(internal, se_reduction) if se_reduction else None
        self.sampling_offsets = nn.Linear(dim, num_heads * num_points * 2)
        self.attention_weights = nn.Linear(dim, num_heads * num_points)
        self.out_proj = nn.Linear(internal, dim)
        self.reset_offsets(offset_init)

    def reset_offsets(self, offset_init: str = "ring") -> None:
        """Zero offset/weight weights; offset bias: point k of head h at (k + 1) pixels along direction
        ``2 pi h / H`` (``"ring"``, the direction scaled so that its larger coordinate is 1) or at the reference
        (``"zero"``); attention weights uniform over the K points."""
        nn.init.zeros_(self.sampling_offsets.weight)
        nn.init.zeros_(self.attention_weights.weight)
        nn.init.zeros_(self.attention_weights.bias)
        with torch.no_grad():
            bias = torch.zeros(self.num_heads, self.num_points, 2)
            if offset_init == "ring":
                theta = torch.arange(self.num_heads, dtype=torch.float32) * (2.0 * math.pi / self.num_heads)
                direction = torch.stack([theta.cos(), theta.sin()], -1)
                direction = direction / direction.abs().max(-1, keepdim=True).values
                bias = direction[:, None, :] * torch.arange(1, self.num_points + 1, dtype=torch.float32)[None, :, None]
            self.sampling_offsets.bias.copy_(bias.flatten())

    def sampling_locations(self, query: Tensor, reference: Tensor, size: tuple[int, int]) -> tuple[Tensor, Tensor]:
        """Locations B x Nq x H x K x 2 in [0, 1] and softmax weights B x Nq x H x K for ``query``."""
        b, nq, _ = query.shape
        h, w = size
        offsets = self.sampling_offsets(query).reshape(b, nq, self.num_heads, self.num_points, 2)
        scale = offsets.new_tensor([w, h])
        locations = reference[:, :, None, None, :].to(offsets.dtype) + offsets / scale
        weights = self.attention_weights(query).reshape(b, nq, self.num_heads, self.num_points).softmax(dim=-1)
        return locations, weights

    def project_value(self, value: Tensor) -> Tensor:
        """B x C x h x w -> SE-gated per-head values B x H x Ch x h x w."""
        b, _, h, w = value.shape
        v = self.value_proj(value.flatten(2).transpose(1, 2))  # B x hw x Ci
        if self.se is not None:
            v = self.se(v)
        return v.transpose(1, 2).reshape(b, self.num_heads, self.internal // self.num_heads, h, w)

    def forward(self, query: Tensor, reference: Tensor, value: Tensor) -> Tensor:
        locations, weights = self.sampling_locations(query, reference, value.shape[-2:])
        return self.out_proj(deformable_sample(self.project_value(value), locations, weights))


class SEAttention(nn.Module):
    """Multi-head softmax attention with an SE gate on the projected values (the released ``DeformableAttention``).

    q: B x Nq x C, k, v: B x Nk x C -> B x Nq x C; internal width C / ``downsample_rate``.
    """

    def __init__(self, dim: int, num_heads: int = 8, downsample_rate: int = 1, se_reduction: int | None = 4):
        super().__init__()
        internal = dim // downsample_rate
        if internal % num_heads:
            raise ConfigError(f"SE attention: internal width {internal} not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.q_proj = nn.Linear(dim, internal)
        self.k_proj = nn.Linear(dim, internal)
        self.v_proj = nn.Linear(dim, internal)
        self.se = ValueSEGate(internal, se_reduction) if se_reduction else None
        self.out_proj = nn.Linear(internal, dim)

    def _heads(self, x: Tensor) -> Tensor:
        b, n, c = x.shape
        return x.reshape(b, n, self.num_heads, c // self.num_heads).transpose(1, 2)

    def forward(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        v = self.v_proj(v)
        if self.se is not None:
            v = self.se(v)
        out = F.scaled_dot_product_attention(self._heads(self.q_proj(q)), self._heads(self.k_proj(k)), self._heads(v))
        b, _, n, _ = out.shape
        return self.out_proj(out.transpose(1, 2).reshape(b, n, -1))


class _MLP(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.lin1 = nn.Linear(dim, hidden)
        self.lin2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.lin2(F.relu(self.lin1(x)))


class DeformableTwoWayBlock(nn.Module):
    """SAM's two-way block layout between two dense maps, with deformable-SE or SE attention.

    queries: B x C x hq x wq (the prompt stream), keys: B x C x hk x wk (the image stream), positional encodings
    of the same shapes (or 1 x C x h x w). Returns (queries', keys') of the input shapes.
    """

    def __init__(self, dim: int = 256, num_heads: int = 8, num_points: int = 4, mlp_dim: int = 1024,
                 attention: str = "deformable_se", downsample_rate: int = 2, se_reduction: int | None = 4,
                 kv_grid: int = 16, offset_init: str = "ring"):
        super().__init__()
        if attention not in ATTENTIONS:
            raise ConfigError(f"attention must be one of {ATTENTIONS}, got {attention!r}")
        self.attention, self.kv_grid = attention, kv_grid
        if attention == "deformable_se":
            def make(rate: int) -> nn.Module:
                return DeformableAttention(dim, num_heads, num_points, rate, se_reduction, offset_init)
        else:
            def make(rate: int) -> nn.Module:
                return SEAttention(dim, num_heads, rate, se_reduction)
        self.self_attn = make(1)  # SAM: self-attention at full width, cross-attention downsampled
        self.norm1 = nn.LayerNorm(dim)
        self.cross_attn_query_to_key = make(downsample_rate)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = _MLP(dim, mlp_dim)
        self.norm3 = nn.LayerNorm(dim)
        self.cross_attn_key_to_query = make(downsample_rate)
        self.norm4 = nn.LayerNorm(dim)

    def _attend(self, attn: nn.Module, q_tokens: Tensor, q_pe: Tensor, kv_map: Tensor, kv_pe: Tensor,
                q_size: tuple[int, int]) -> Tensor:
        """Queries (tokens B x N x C on a q_size grid, PE tokens) attend to a B x C x h x w map (its PE map)."""
        if self.attention == "deformable_se":
            ref = grid_reference(*q_size, q_tokens.shape[0], q_tokens)
            return attn(q_tokens + q_pe, ref, kv_map)
        side = (min(self.kv_grid, kv_map.shape[-2]), min(self.kv_grid, kv_map.shape[-1])) if self.kv_grid else None
        if side is not None and side != tuple(kv_map.shape[-2:]):
            kv_map, kv_pe = F.adaptive_avg_pool2d(kv_map, side), F.adaptive_avg_pool2d(kv_pe, side)
        v = kv_map.flatten(2).transpose(1, 2)
        k = v + kv_pe.flatten(2).transpose(1, 2)
        return attn(q_tokens + q_pe, k, v)

    def forward(self, queries: Tensor, keys: Tensor, query_pe: Tensor, key_pe: Tensor) -> tuple[Tensor, Tensor]:
        b, c, hq, wq = queries.shape
        hk, wk = keys.shape[-2:]
        query_pe = query_pe.expand(b, -1, -1, -1)
        key_pe = key_pe.expand(b, -1, -1, -1)
        q = queries.flatten(2).transpose(1, 2)  # B x Nq x C
        k = keys.flatten(2).transpose(1, 2)  # B x Nk x C
        qpe = query_pe.flatten(2).transpose(1, 2)
        kpe = key_pe.flatten(2).transpose(1, 2)

        def as_map(tokens: Tensor, h: int, w: int) -> Tensor:
            return tokens.transpose(1, 2).reshape(b, c, h, w)

        q = self.norm1(q + self._attend(self.self_attn, q, qpe, as_map(q, hq, wq), query_pe, (hq, wq)))
        q = self.norm2(q + self._attend(self.cross_attn_query_to_key, q, qpe, as_map(k, hk, wk), key_pe, (hq, wq)))
        q = self.norm3(q + self.mlp(q))
        k = self.norm4(k + self._attend(self.cross_attn_key_to_query, k, kpe, as_map(q, hq, wq), query_pe, (hk, wk)))
        return as_map(q, hq, wq), as_map(k, hk, wk)


class DeformableSEFusion(nn.Module):
    """``E' = E + Z(keys out of depth x DeformableTwoWayBlock(queries=D, keys=E))``, Z zero-initialised.

    embedding E, dense D: B x C x h x w; pe: 1 x C x h x w (the backbone's dense PE) -> E' B x C x h x w.
    """

    def __init__(self, dim: int = 256, depth: int = 1, zero_init: bool = True, **block_options):
        super().__init__()
        self.blocks = nn.ModuleList(DeformableTwoWayBlock(dim, **block_options) for _ in range(depth))
        self.out = nn.Linear(dim, dim)
        if zero_init:
            nn.init.zeros_(self.out.weight)
            nn.init.zeros_(self.out.bias)

    def forward(self, embedding: Tensor, dense: Tensor, pe: Tensor) -> Tensor:
        q, k = dense, embedding
        for block in self.blocks:
            q, k = block(q, k, pe, pe)
        delta = self.out(k.flatten(2).transpose(1, 2)).transpose(1, 2).reshape_as(embedding)
        return embedding + delta
