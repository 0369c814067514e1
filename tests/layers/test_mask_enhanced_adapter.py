"""Mask-Enhanced Adapter: the chunked relative-position attention equals the whole-bias one, keeps no N x N tensor
for backward, and the 3D variant (3D convs, d/h/w tables) runs."""

from __future__ import annotations

import math

import pytest
import torch

from samadapt.layers.mask_enhanced_adapter import MaskEnhancedAdapter, RelPosSelfAttention


def _random_tables(module: torch.nn.Module) -> None:
    with torch.no_grad():
        for name, p in module.named_parameters():
            if "rel_pos_" in name:
                p.normal_()


def _whole_bias_attention(attn: RelPosSelfAttention, x: torch.Tensor) -> torch.Tensor:
    """Reference: the full N x N decomposed bias built at once (the pre-chunking formulation)."""
    b, *grid, c = x.shape
    n, nh, hd = math.prod(grid), attn.num_heads, attn.head_dim
    q, k, v = attn.qkv(x).reshape(b, n, 3, nh, hd).permute(2, 0, 3, 1, 4).unbind(0)
    coords = torch.stack(torch.meshgrid(*[torch.arange(g) for g in grid], indexing="ij"), -1).reshape(n, len(grid))
    bias = q.new_zeros(b, nh, n, n)
    for a, axis in enumerate(attn.axes):
        table = getattr(attn, f"rel_pos_{axis}")
        offsets = coords[:, None, a] - coords[None, :, a] + grid[a] - 1  # N x N
        bias = bias + torch.einsum("bhnc,nmc->bhnm", q, table[offsets])
    logits = q @ k.transpose(-1, -2) / math.sqrt(hd) + bias
    out = torch.softmax(logits, -1) @ v
    return attn.proj(out.transpose(1, 2).reshape(b, *grid, c))


@pytest.mark.parametrize("grid", [(4, 6), (3, 4, 5)])
def test_chunked_attention_equals_the_whole_bias_in_value_and_gradient(grid):
    torch.manual_seed(0)
    attn = RelPosSelfAttention(16, 2, grid, query_chunk=5)  # 5 does not divide N: a ragged last block
    _random_tables(attn)
    x = torch.randn(2, *grid, 16, requires_grad=True)
    out = attn(x)
    ref = _whole_bias_attention(attn, x)
    assert torch.allclose(out, ref, atol=1e-5)
    w = torch.randn_like(out)
    grads = torch.autograd.grad((out * w).sum(), [x, *attn.parameters()])
    ref_grads = torch.autograd.grad((ref * w).sum(), [x, *attn.parameters()])
    for g, r in zip(grads, ref_grads):
        assert torch.allclose(g, r, atol=1e-4)


def test_backward_keeps_no_query_by_key_tensor():
    torch.manual_seed(0)
    grid, heads, chunk = (8, 8), 2, 16
    n = math.prod(grid)
    attn = RelPosSelfAttention(16, heads, grid, query_chunk=chunk)
    x = torch.randn(1, *grid, 16, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        out = attn(x)
    out.sum().backward()
    assert x.grad is not None and max(saved) < heads * n * n // 2  # whole-bias attention saves heads x N x N
    whole = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: whole.append(t.numel()) or t, lambda t: t):
        RelPosSelfAttention(16, heads, grid, query_chunk=n)(x)
    assert max(whole) >= heads * n * n  # one block: the bias is whole (cheap grids run as before)


@pytest.mark.parametrize("tokens", ["full", "pooled"])
def test_3d_mea_shapes_and_tables(tokens):
    torch.manual_seed(0)
    mea = MaskEnhancedAdapter(24, (4, 4, 4), num_heads=2, mlp_ratio=2.0, tokens=tokens, pool_size=2, query_chunk=16)
    assert isinstance(mea.blocks[0].conv_i.conv3, torch.nn.Conv3d)
    assert mea.blocks[0].conv_i.conv3.kernel_size == (3, 3, 3)
    side = 4 if tokens == "full" else 2
    assert {n.rsplit(".", 1)[1]: tuple(p.shape) for n, p in mea.attn_f.named_parameters() if "rel_pos" in n} == {
        f"rel_pos_{a}": (2 * side - 1, 12) for a in "dhw"}
    image, mask = torch.randn(2, 24, 4, 4, 4), torch.randn(2, 24, 4, 4, 4)
    out = mea(image, mask)
    assert out.shape == (2, 24, 4, 4, 4) and torch.isfinite(out).all()
    out.mean().backward()
    assert all(p.grad is not None for p in mea.parameters())


def test_grid_rank_is_checked():
    with pytest.raises(ValueError, match="2D or 3D"):
        RelPosSelfAttention(8, 2, (4,))
    with pytest.raises(ValueError, match="3-D grid"):
        RelPosSelfAttention(8, 2, (2, 2, 2))(torch.randn(1, 2, 2, 8))


@pytest.mark.parametrize("grid, size", [((8, 8), (4, 4)), ((6, 9), (3, 3)), ((7, 8), (3, 4)), ((4, 6, 8), (2, 3, 4))])
def test_average_pool_is_adaptive_pooling(grid, size):
    """The export-friendly pool (a plain average pool where the sides divide) gives adaptive pooling's values."""
    from samadapt.layers.mask_enhanced_adapter import _average_pool

    x = torch.randn(2, 3, *grid)
    adaptive = torch.nn.functional.adaptive_avg_pool2d if len(grid) == 2 else torch.nn.functional.adaptive_avg_pool3d
    assert torch.allclose(_average_pool(x, size), adaptive(x, size), atol=1e-6)
