"""M-SAM's Mask-Enhanced Adapter (MEA), 2D port (METHODS.md sections 4.2 and 4.6).

The MEA fuses the image embedding ``I`` (B x C x h x w) with the embedding ``P`` (B x C x h x w) of the previous
iteration's mask (the prompt encoder's ``mask_downscaling`` of the low-res logits) and replaces SAM's
``src = I + dense`` in front of the mask decoder's two-way transformer. As released (``mea.py``,
``BiDirectionalAttentionNetwork``), with every LN a channel LayerNorm::

    I0 = LN(I)                 P0 = LN(P)
    I' = ConvRes(I0)           P' = ConvRes(P0)          ConvRes(X) = LN(conv1x1(GELU(LN(conv3x3(X)))) + X)
    I'' = LN(Attn_i(I' + I0 + P0) + I')      I'' = LN(MLP(I'') + I'')
    P'' = LN(Attn_p(I0 + P' + P0) + P')      P'' = LN(MLP(P'') + P'')
    S = I'' + I0 + P'' + P0
    O = LN(Attn_f(S) + S)      out = O + MLP(O)                                     -> B x C x h x w

``Attn(x)`` (the release's ``Attention`` class) is ``y = x + MHSA(LN(x))`` followed by ``MLP(LN(y))`` returned
*without* a residual (the caller adds one). MHSA is multi-head self-attention over the summed map's tokens with
decomposed relative positions (``rel_pos_h`` (2 g_h - 1) x head_dim, ``rel_pos_w`` likewise, zero init, as in SAM's
ViT). The "attention" is self-attention over sums: image and mask meet by addition, not cross-attention.

Attention tokens (``tokens``): ``"full"`` attends over all h x w tokens (faithful; 4096 tokens on a 64 x 64 grid,
about 0.5 GB of attention weights per image in fp32); ``"pooled"`` average-pools LN(x) to at most ``pool_size`` x
``pool_size`` tokens, attends there, upsamples the attention output bilinearly to h x w and adds it as the residual
(a grid no larger than ``pool_size`` is attended in full). MLPs and convolutions always run at h x w.

``num_blocks`` > 1 chains bidirectional blocks (block k takes block k-1's ``I''``, ``P''`` as its ``I0``, ``P0``); the
release uses one. Written for 2D; the release's 3D variant has the same structure with 3D convs and rel-pos tables.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

TOKEN_MODES = ("full", "pooled")


def _to_nhwc(x: Tensor) -> Tensor:
    return x.permute(0, 2, 3, 1)


def _to_nchw(x: Tensor) -> Tensor:
    return x.permute(0, 3, 1, 2)


class MLP(nn.Module):
    """Linear(C, r C) -> GELU -> Linear(r C, C) on the last axis (tokens or NHWC maps)."""

    def __init__(self, dim: int, ratio: float = 4.0):
        super().__init__()
        hidden = int(round(dim * ratio))
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


def _rel_table(table: Tensor, size: int) -> Tensor:
    """Relative-position embeddings for every (query, key) coordinate pair along one axis: size x size x D.

    ``table`` holds 2 L - 1 rows (offsets -(L-1)..L-1) for the length L it was built for; it is resampled linearly
    when the grid has another length (as SAM's ViT does for other input sizes)."""
    needed = 2 * size - 1
    if table.shape[0] != needed:
        table = F.interpolate(table.t()[None], size=needed, mode="linear", align_corners=False)[0].t()
    coords = torch.arange(size, device=table.device)
    return table[coords[:, None] - coords[None, :] + (size - 1)]


class RelPosSelfAttention(nn.Module):
    """Multi-head self-attention over a g_h x g_w token grid with decomposed relative positions.

    x: B x g_h x g_w x C -> B x g_h x g_w x C. The attention logits of query (i, j) and key (k, l) get
    ``q_ij . R_h[i - k] + q_ij . R_w[j - l]`` added (unscaled q, as SAM's ``add_decomposed_rel_pos``).
    """

    def __init__(self, dim: int, num_heads: int, grid: tuple[int, int]):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"MEA attention: dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=True)
        self.proj = nn.Linear(dim, dim)
        self.rel_pos_h = nn.Parameter(torch.zeros(2 * grid[0] - 1, self.head_dim))
        self.rel_pos_w = nn.Parameter(torch.zeros(2 * grid[1] - 1, self.head_dim))

    def forward(self, x: Tensor) -> Tensor:
        b, gh, gw, c = x.shape
        n, nh, hd = gh * gw, self.num_heads, self.head_dim
        q, k, v = self.qkv(x).reshape(b, n, 3, nh, hd).permute(2, 0, 3, 1, 4).unbind(0)  # each B x nh x N x hd
        rh = _rel_table(self.rel_pos_h, gh).to(q.dtype)  # gh x gh x hd
        rw = _rel_table(self.rel_pos_w, gw).to(q.dtype)  # gw x gw x hd
        qg = q.reshape(b, nh, gh, gw, hd)
        bias_h = torch.einsum("bnhwc,hkc->bnhwk", qg, rh)  # B x nh x gh x gw x gh
        bias_w = torch.einsum("bnhwc,wkc->bnhwk", qg, rw)  # B x nh x gh x gw x gw
        bias = (bias_h[..., :, None] + bias_w[..., None, :]).reshape(b, nh, n, n)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)  # B x nh x N x hd
        return self.proj(out.transpose(1, 2).reshape(b, gh, gw, c))


class MEAAttention(nn.Module):
    """The release's ``Attention``: ``y = x + MHSA(LN(x))``; returns ``MLP(LN(y))`` (no residual around the MLP).

    x: B x h x w x C (NHWC) -> B x h x w x C. ``tokens="pooled"``: MHSA on LN(x) average-pooled to at most
    ``pool_size`` x ``pool_size``, its output bilinearly upsampled to h x w.
    """

    def __init__(self, dim: int, num_heads: int, grid: tuple[int, int], mlp_ratio: float = 4.0,
                 tokens: str = "pooled", pool_size: int = 32):
        super().__init__()
        if tokens not in TOKEN_MODES:
            raise ValueError(f"MEA tokens must be one of {TOKEN_MODES}, got {tokens!r}")
        self.tokens = tokens
        self.pool_size = int(pool_size)
        self.attn_grid = self._attn_grid(grid)
        self.norm1 = nn.LayerNorm(dim)
        self.attn = RelPosSelfAttention(dim, num_heads, self.attn_grid)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = MLP(dim, mlp_ratio)

    def _attn_grid(self, grid: tuple[int, int]) -> tuple[int, int]:
        if self.tokens == "full":
            return (int(grid[0]), int(grid[1]))
        return (min(int(grid[0]), self.pool_size), min(int(grid[1]), self.pool_size))

    def forward(self, x: Tensor) -> Tensor:
        h, w = x.shape[1:3]
        z = self.norm1(x)
        ah, aw = self._attn_grid((h, w))
        if (ah, aw) != (h, w):
            pooled = _to_nhwc(F.adaptive_avg_pool2d(_to_nchw(z), (ah, aw)))
            att = self.attn(pooled)
            att = _to_nhwc(F.interpolate(_to_nchw(att), size=(h, w), mode="bilinear", align_corners=False))
        else:
            att = self.attn(z)
        y = x + att
        return self.mlp(self.norm2(y))


class ConvResidual(nn.Module):
    """``LN(conv1x1(GELU(LN(conv3x3(X)))) + X)`` on NHWC maps (B x h x w x C -> same)."""

    def __init__(self, dim: int):
        super().__init__()
        self.conv3 = nn.Conv2d(dim, dim, 3, padding=1, bias=True)
        self.norm1 = nn.LayerNorm(dim)
        self.conv1 = nn.Conv2d(dim, dim, 1, bias=True)
        self.norm2 = nn.LayerNorm(dim)

    def forward(self, x: Tensor) -> Tensor:
        y = self.norm1(_to_nhwc(self.conv3(_to_nchw(x))))
        y = _to_nhwc(self.conv1(_to_nchw(F.gelu(y))))
        return self.norm2(y + x)


class BidirectionalBlock(nn.Module):
    """One image/mask block: conv residual branches, then rel-pos self-attention over the summed maps.

    (I0, P0) NHWC B x h x w x C each -> (I'', P''), same shapes (see the module docstring)."""

    def __init__(self, dim: int, num_heads: int, grid: tuple[int, int], mlp_ratio: float, tokens: str,
                 pool_size: int):
        super().__init__()
        self.conv_i = ConvResidual(dim)
        self.conv_p = ConvResidual(dim)
        self.attn_i = MEAAttention(dim, num_heads, grid, mlp_ratio, tokens, pool_size)
        self.attn_p = MEAAttention(dim, num_heads, grid, mlp_ratio, tokens, pool_size)
        self.norm_i1, self.norm_i2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.norm_p1, self.norm_p2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.mlp_i = MLP(dim, mlp_ratio)
        self.mlp_p = MLP(dim, mlp_ratio)

    def forward(self, i0: Tensor, p0: Tensor) -> tuple[Tensor, Tensor]:
        i1 = self.conv_i(i0)
        p1 = self.conv_p(p0)
        i2 = self.norm_i1(self.attn_i(i1 + i0 + p0) + i1)
        i2 = self.norm_i2(self.mlp_i(i2) + i2)
        p2 = self.norm_p1(self.attn_p(i0 + p1 + p0) + p1)
        p2 = self.norm_p2(self.mlp_p(p2) + p2)
        return i2, p2


class MaskEnhancedAdapter(nn.Module):
    """Fuse an image embedding with a mask embedding: (B x C x h x w, B x C x h x w) -> B x C x h x w.

    ``dim`` = C (256 for SAM-family decoders); ``grid`` = (h, w) the embedding grid (sizes the rel-pos tables;
    other grids work by resampling them); ``num_heads`` 8 (head_dim 32 at C = 256); ``mlp_ratio`` 4 as released;
    ``tokens`` ``"full"`` | ``"pooled"``; ``pool_size`` the pooled attention grid side.
    """

    def __init__(self, dim: int = 256, grid: tuple[int, int] = (64, 64), num_heads: int = 8, mlp_ratio: float = 4.0,
                 tokens: str = "pooled", pool_size: int = 32, num_blocks: int = 1):
        super().__init__()
        if tokens not in TOKEN_MODES:
            raise ValueError(f"MEA tokens must be one of {TOKEN_MODES}, got {tokens!r}")
        if num_blocks < 1:
            raise ValueError(f"MEA num_blocks must be >= 1, got {num_blocks}")
        self.dim, self.tokens = dim, tokens
        self.norm_i = nn.LayerNorm(dim)
        self.norm_p = nn.LayerNorm(dim)
        self.blocks = nn.ModuleList(
            BidirectionalBlock(dim, num_heads, grid, mlp_ratio, tokens, pool_size) for _ in range(num_blocks))
        self.attn_f = MEAAttention(dim, num_heads, grid, mlp_ratio, tokens, pool_size)
        self.norm_f = nn.LayerNorm(dim)
        self.mlp_f = MLP(dim, mlp_ratio)

    def forward(self, image_embedding: Tensor, mask_embedding: Tensor) -> Tensor:
        if image_embedding.shape != mask_embedding.shape:
            raise ValueError(f"MEA needs equal shapes, got image {tuple(image_embedding.shape)} and mask "
                             f"{tuple(mask_embedding.shape)}")
        if image_embedding.shape[1] != self.dim:
            raise ValueError(f"MEA built for {self.dim} channels, got {image_embedding.shape[1]}")
        i0 = self.norm_i(_to_nhwc(image_embedding))
        p0 = self.norm_p(_to_nhwc(mask_embedding))
        for block in self.blocks:
            i2, p2 = block(i0, p0)
            s = i2 + i0 + p2 + p0
            i0, p0 = i2, p2
        o = self.norm_f(self.attn_f(s) + s)
        return _to_nchw(o + self.mlp_f(o)).contiguous()
