"""M-SAM's Mask-Enhanced Adapter (MEA), 2D and 3D (METHODS.md sections 4.2 and 4.6).

The MEA fuses the image embedding ``I`` (B x C x h x w, or B x C x d x h x w in 3D) with the embedding ``P`` (same
shape) of the previous
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
whose 8 x 4096 x 4096 bias and weights are built in query blocks, never whole: see ``RelPosSelfAttention``);
``"pooled"`` average-pools LN(x) to at most ``pool_size`` x
``pool_size`` tokens, attends there, upsamples the attention output bilinearly to h x w and adds it as the residual
(a grid no larger than ``pool_size`` is attended in full). MLPs and convolutions always run at h x w.

``num_blocks`` > 1 chains bidirectional blocks (block k takes block k-1's ``I''``, ``P''`` as its ``I0``, ``P0``); the
release uses one. A 3-long ``grid`` gives the release's 3D variant: 3x3x3 / 1x1x1 convolutions, LayerNorm over
channels (LayerNorm3d), trilinear pooling, and decomposed relative positions ``rel_pos_d``, ``rel_pos_h``,
``rel_pos_w`` (15 x 64 each at the release's 8^3 grid, 384 channels, 6 heads).
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

TOKEN_MODES = ("full", "pooled")


def _move_axis(x: Tensor, source: int, destination: int) -> Tensor:
    """``x.movedim`` with the axes made non-negative first (torch.onnx writes a negative one into an invalid
    Transpose permutation)."""
    return x.movedim(source % x.dim(), destination % x.dim())


def _to_nhwc(x: Tensor) -> Tensor:
    """B x C x (grid) -> B x (grid) x C (2D or 3D)."""
    return _move_axis(x, 1, -1)


def _to_nchw(x: Tensor) -> Tensor:
    """B x (grid) x C -> B x C x (grid)."""
    return _move_axis(x, -1, 1)


def _static_grid(x: Tensor) -> tuple[int, ...]:
    """The spatial sides of a channels-last map B x (grid) x C as Python ints: a model's grid is fixed (its
    embedding grid or the pooled one), so an ONNX trace keeps only the batch dynamic."""
    return tuple(int(g) for g in x.shape[1:-1])


def attention_grid(grid: Sequence[int], tokens: str, pool_size: int) -> tuple[int, ...]:
    """The grid the MEA's attention runs on: ``grid`` itself (``tokens="full"``), or each side capped at
    ``pool_size`` (``"pooled"``)."""
    if tokens == "full":
        return tuple(int(g) for g in grid)
    return tuple(min(int(g), int(pool_size)) for g in grid)


def _average_pool(x: Tensor, size: tuple[int, ...]) -> Tensor:
    """Adaptive average pooling of B x C x (grid) to ``size``; a plain average pool with kernel = stride = grid //
    size where every side divides (the same values, and a graph torch.onnx can export with a dynamic batch)."""
    grid = tuple(int(g) for g in x.shape[2:])
    if all(g % s == 0 for g, s in zip(grid, size)):
        pool = F.avg_pool2d if len(size) == 2 else F.avg_pool3d
        kernel = tuple(g // s for g, s in zip(grid, size))
        return pool(x, kernel, kernel)
    return (F.adaptive_avg_pool2d if len(size) == 2 else F.adaptive_avg_pool3d)(x, size)


def _conv(ndim: int, dim: int, kernel: int) -> nn.Module:
    conv = nn.Conv2d if ndim == 2 else nn.Conv3d
    return conv(dim, dim, kernel, padding=kernel // 2, bias=True)


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


def _axis_names(ndim: int) -> tuple[str, ...]:
    if ndim not in (2, 3):
        raise ValueError(f"MEA works on 2D or 3D grids, got a {ndim}-D grid")
    return ("h", "w") if ndim == 2 else ("d", "h", "w")


def _chunk_bias(axis_biases: list[Tensor], grid: tuple[int, ...]) -> Tensor:
    """Decomposed bias of a block of c queries against all N keys: B x nh x c x N.

    ``axis_biases[a]`` is B x nh x c x g_a (the queries' dot products with the axis-a offset embeddings); the bias of
    key (k_1, ..., k_n) is the sum over axes of entry k_a."""
    b, nh, c = axis_biases[0].shape[:3]
    bias = None
    for a, part in enumerate(axis_biases):
        shape = [b, nh, c] + [1] * len(grid)
        shape[3 + a] = grid[a]
        part = part.reshape(shape)
        bias = part if bias is None else bias + part
    return bias.reshape(b, nh, c, -1)


def _attend_chunk(q: Tensor, k: Tensor, v: Tensor, grid: tuple[int, ...], *axis_biases: Tensor) -> Tensor:
    return F.scaled_dot_product_attention(q, k, v, attn_mask=_chunk_bias(list(axis_biases), grid))


class RelPosSelfAttention(nn.Module):
    """Multi-head self-attention over a token grid (g_h x g_w, or g_d x g_h x g_w) with decomposed relative positions.

    x: B x g_1 x .. x g_n x C -> same. The attention logits of query ``i`` and key ``k`` get
    ``sum_a q_i . R_a[i_a - k_a]`` added (unscaled q, as SAM's ``add_decomposed_rel_pos``); tables ``rel_pos_h``,
    ``rel_pos_w`` (2D) or ``rel_pos_d``, ``rel_pos_h``, ``rel_pos_w`` (3D), each (2 g_a - 1) x head_dim.

    Memory: the N x N bias is never built whole. Queries go in blocks of ``query_chunk`` (bias B x nh x chunk x N per
    block); with gradients on and more than one block, each block is recomputed in backward (activation
    checkpointing), so only q, k, v and the per-axis biases (B x nh x N x g_a) are kept, not the N x N weights.
    """

    def __init__(self, dim: int, num_heads: int, grid: tuple[int, ...], query_chunk: int = 1024):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"MEA attention: dim {dim} is not divisible by num_heads {num_heads}")
        if query_chunk < 1:
            raise ValueError(f"MEA attention: query_chunk must be >= 1, got {query_chunk}")
        self.axes = _axis_names(len(grid))
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.query_chunk = int(query_chunk)
        self.qkv = nn.Linear(dim, 3 * dim, bias=True)
        self.proj = nn.Linear(dim, dim)
        for axis, size in zip(self.axes, grid):
            setattr(self, f"rel_pos_{axis}", nn.Parameter(torch.zeros(2 * int(size) - 1, self.head_dim)))

    def forward(self, x: Tensor) -> Tensor:
        b, c, grid = x.shape[0], x.shape[-1], _static_grid(x)
        if len(grid) != len(self.axes):
            raise ValueError(f"MEA attention built for a {len(self.axes)}-D grid, got input {tuple(x.shape)}")
        n, nh, hd = math.prod(grid), self.num_heads, self.head_dim
        q, k, v = self.qkv(x).reshape(b, n, 3, nh, hd).permute(2, 0, 3, 1, 4).unbind(0)  # each B x nh x N x hd
        qg = q.reshape(b, nh, *grid, hd)
        axis_biases = []
        for a, axis in enumerate(self.axes):
            table = _rel_table(getattr(self, f"rel_pos_{axis}"), grid[a]).to(q.dtype)  # g_a x g_a x hd
            moved = _move_axis(qg, 2 + a, -2)  # B x nh x (other axes) x g_a x hd
            part = _move_axis(torch.einsum("...ic,ikc->...ik", moved, table), -2, 2 + a)  # B x nh x grid x g_a
            axis_biases.append(part.reshape(b, nh, n, grid[a]))
        step = self.query_chunk
        recompute = torch.is_grad_enabled() and n > step
        outs = []
        for s in range(0, n, step):
            args = (q[:, :, s:s + step], k, v, grid, *(p[:, :, s:s + step] for p in axis_biases))
            if recompute:
                outs.append(checkpoint(_attend_chunk, *args, use_reentrant=False))
            else:
                outs.append(_attend_chunk(*args))
        out = outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)  # B x nh x N x hd
        return self.proj(out.transpose(1, 2).reshape(b, *grid, c))


class MEAAttention(nn.Module):
    """The release's ``Attention``: ``y = x + MHSA(LN(x))``; returns ``MLP(LN(y))`` (no residual around the MLP).

    x: B x (grid) x C (channels last; grid h x w or d x h x w) -> same. ``tokens="pooled"``: MHSA on LN(x)
    average-pooled to at most ``pool_size`` per axis, its output bi/trilinearly upsampled back to the grid.
    """

    def __init__(self, dim: int, num_heads: int, grid: tuple[int, ...], mlp_ratio: float = 4.0,
                 tokens: str = "pooled", pool_size: int = 32, query_chunk: int = 1024):
        super().__init__()
        if tokens not in TOKEN_MODES:
            raise ValueError(f"MEA tokens must be one of {TOKEN_MODES}, got {tokens!r}")
        self.tokens = tokens
        self.pool_size = int(pool_size)
        self.attn_grid = self._attn_grid(grid)
        self.norm1 = nn.LayerNorm(dim)
        self.attn = RelPosSelfAttention(dim, num_heads, self.attn_grid, query_chunk)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = MLP(dim, mlp_ratio)

    def _attn_grid(self, grid: tuple[int, ...]) -> tuple[int, ...]:
        return attention_grid(grid, self.tokens, self.pool_size)

    def forward(self, x: Tensor) -> Tensor:
        grid = _static_grid(x)
        z = self.norm1(x)
        attn_grid = self._attn_grid(grid)
        if attn_grid != grid:
            att = self.attn(_to_nhwc(_average_pool(_to_nchw(z), attn_grid)))
            mode = "bilinear" if len(grid) == 2 else "trilinear"
            att = _to_nhwc(F.interpolate(_to_nchw(att), size=grid, mode=mode, align_corners=False))
        else:
            att = self.attn(z)
        y = x + att
        return self.mlp(self.norm2(y))


class ConvResidual(nn.Module):
    """``LN(conv1x1(GELU(LN(conv3x3(X)))) + X)`` on channels-last maps (B x (grid) x C -> same); 3x3x3 and 1x1x1
    convolutions when ``ndim`` is 3."""

    def __init__(self, dim: int, ndim: int = 2):
        super().__init__()
        self.conv3 = _conv(ndim, dim, 3)
        self.norm1 = nn.LayerNorm(dim)
        self.conv1 = _conv(ndim, dim, 1)
        self.norm2 = nn.LayerNorm(dim)

    def forward(self, x: Tensor) -> Tensor:
        y = self.norm1(_to_nhwc(self.conv3(_to_nchw(x))))
        y = _to_nhwc(self.conv1(_to_nchw(F.gelu(y))))
        return self.norm2(y + x)


class BidirectionalBlock(nn.Module):
    """One image/mask block: conv residual branches, then rel-pos self-attention over the summed maps.

    (I0, P0) channels-last B x (grid) x C each -> (I'', P''), same shapes (see the module docstring)."""

    def __init__(self, dim: int, num_heads: int, grid: tuple[int, ...], mlp_ratio: float, tokens: str,
                 pool_size: int, query_chunk: int = 1024):
        super().__init__()
        self.conv_i = ConvResidual(dim, len(grid))
        self.conv_p = ConvResidual(dim, len(grid))
        self.attn_i = MEAAttention(dim, num_heads, grid, mlp_ratio, tokens, pool_size, query_chunk)
        self.attn_p = MEAAttention(dim, num_heads, grid, mlp_ratio, tokens, pool_size, query_chunk)
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
    """Fuse an image embedding with a mask embedding: (B x C x (grid), B x C x (grid)) -> B x C x (grid).

    ``dim`` = C (256 for SAM-family decoders, 384 for SAM-Med3D); ``grid`` = the embedding grid, (h, w) or
    (d, h, w) (its length picks 2D or 3D convolutions, pooling and rel-pos tables; the sizes size the tables, other
    grids work by resampling them); ``num_heads`` 8 (head_dim 32 at C = 256; the 3D release: 6 heads of 64);
    ``mlp_ratio`` 4 as released; ``tokens`` ``"full"`` | ``"pooled"``; ``pool_size`` the pooled attention grid side;
    ``query_chunk`` the attention's query block (memory; see ``RelPosSelfAttention``).
    """

    def __init__(self, dim: int = 256, grid: tuple[int, ...] = (64, 64), num_heads: int = 8, mlp_ratio: float = 4.0,
                 tokens: str = "pooled", pool_size: int = 32, num_blocks: int = 1, query_chunk: int = 1024):
        super().__init__()
        if tokens not in TOKEN_MODES:
            raise ValueError(f"MEA tokens must be one of {TOKEN_MODES}, got {tokens!r}")
        if num_blocks < 1:
            raise ValueError(f"MEA num_blocks must be >= 1, got {num_blocks}")
        self.dim, self.tokens = dim, tokens
        self.norm_i = nn.LayerNorm(dim)
        self.norm_p = nn.LayerNorm(dim)
        self.blocks = nn.ModuleList(
            BidirectionalBlock(dim, num_heads, grid, mlp_ratio, tokens, pool_size, query_chunk)
            for _ in range(num_blocks))
        self.attn_f = MEAAttention(dim, num_heads, grid, mlp_ratio, tokens, pool_size, query_chunk)
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
