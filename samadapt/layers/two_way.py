"""SAM's two-way transformer run in a chosen block order, optionally with prior-weighted cross-attention.

``run_two_way`` runs the submodules of a SAM ``TwoWayTransformer`` (``layers[i].self_attn``, ``norm1..4``,
``cross_attn_token_to_image``, ``mlp``, ``cross_attn_image_to_token``, ``final_attn_token_to_image``,
``norm_final_attn``) without calling its ``forward``, so pretrained decoders (segment-anything's and LiteMedSAM's
vendored copy) can be run in another block order:

- ``order="sam"``: self-attn -> token-to-image -> MLP -> image-to-token (SAM; identical to ``transformer(...)``);
- ``order="hsam"``: token-to-image -> self-attn -> MLP -> image-to-token (H-SAM's ``TwoWayAttentionBlock``). In a
  block with ``skip_first_layer_pe`` (layer 0) the self-attention output *replaces* the queries (no residual, no
  PE), in both orders, so in H-SAM's order layer 0's token-to-image result survives only through that self-attention.

Each sub-layer keeps its own norm (self-attn -> ``norm1``, token-to-image -> ``norm2``, MLP -> ``norm3``,
image-to-token -> ``norm4``), so SAM's weights load into either order unchanged.

``MaskedTwoWayTransformer`` is H-SAM's stage-2 transformer: the same layout with ``PriorWeightedAttention`` (no
internal downsampling) for both cross-attentions, whose softmax attention is multiplied elementwise by a prior
(token-to-image: ``B x T x HW``; image-to-token: its transpose) without renormalisation, and dropout on the
token-to-image output. Its final token-to-image attention is a plain SAM attention (downsample 2).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from segment_anything.modeling.common import MLPBlock
from segment_anything.modeling.transformer import Attention

from ..errors import ConfigError

ORDERS = ("sam", "hsam")


class PriorWeightedAttention(Attention):
    """SAM attention whose softmax weights are multiplied by ``weight`` (B x Nq x Nk, shared by the heads).

    q: B x Nq x C, k/v: B x Nk x C -> B x Nq x C. ``weight=None`` gives plain attention.
    """

    def forward(self, q: Tensor, k: Tensor, v: Tensor, weight: Tensor | None = None) -> Tensor:
        q = self._separate_heads(self.q_proj(q), self.num_heads)
        k = self._separate_heads(self.k_proj(k), self.num_heads)
        v = self._separate_heads(self.v_proj(v), self.num_heads)
        attn = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1]), dim=-1)  # B x heads x Nq x Nk
        if weight is not None:
            attn = attn * weight.unsqueeze(1).to(attn.dtype)
        return self.out_proj(self._recombine_heads(attn @ v))


class MaskedTwoWayBlock(nn.Module):
    """One stage-2 block (attribute names as SAM's ``TwoWayAttentionBlock``; H-SAM's ``TwoWayAttentionBlock2``)."""

    def __init__(self, dim: int, num_heads: int, mlp_dim: int, skip_first_layer_pe: bool = False,
                 t2i_dropout: float = 0.2):
        super().__init__()
        self.self_attn = Attention(dim, num_heads)
        self.norm1 = nn.LayerNorm(dim)
        self.cross_attn_token_to_image = PriorWeightedAttention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = MLPBlock(dim, mlp_dim, nn.ReLU)
        self.norm3 = nn.LayerNorm(dim)
        self.norm4 = nn.LayerNorm(dim)
        self.cross_attn_image_to_token = PriorWeightedAttention(dim, num_heads)
        self.skip_first_layer_pe = skip_first_layer_pe
        self.t2i_dropout = nn.Dropout(t2i_dropout)


class MaskedTwoWayTransformer(nn.Module):
    """H-SAM's stage-2 transformer (``TwoWayTransformer2``); run it with ``run_two_way(..., order="hsam")``."""

    def __init__(self, depth: int = 2, dim: int = 256, num_heads: int = 8, mlp_dim: int = 2048,
                 attention_downsample_rate: int = 2, t2i_dropout: float = 0.2):
        super().__init__()
        self.layers = nn.ModuleList(
            MaskedTwoWayBlock(dim, num_heads, mlp_dim, skip_first_layer_pe=(i == 0), t2i_dropout=t2i_dropout)
            for i in range(depth))
        self.final_attn_token_to_image = Attention(dim, num_heads, downsample_rate=attention_downsample_rate)
        self.norm_final_attn = nn.LayerNorm(dim)


def _attend(module: nn.Module, q: Tensor, k: Tensor, v: Tensor, weight: Tensor | None) -> Tensor:
    if weight is None:
        return module(q=q, k=k, v=v)
    if not isinstance(module, PriorWeightedAttention):
        raise ConfigError(f"a prior was given but {type(module).__name__} cannot weight its attention")
    return module(q=q, k=k, v=v, weight=weight)


def run_block(block: nn.Module, queries: Tensor, keys: Tensor, query_pe: Tensor, key_pe: Tensor,
              order: str = "sam", prior: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """One two-way block. queries/query_pe: B x T x C; keys/key_pe: B x HW x C; prior: optional B x T x HW.

    Returns (queries B x T x C, keys B x HW x C).
    """
    if order not in ORDERS:
        raise ConfigError(f"unknown block order {order!r}; use one of {ORDERS}")
    dropout = getattr(block, "t2i_dropout", None)

    def token_to_image(queries: Tensor) -> Tensor:
        out = _attend(block.cross_attn_token_to_image, queries + query_pe, keys + key_pe, keys, prior)
        if dropout is not None:
            out = dropout(out)
        return block.norm2(queries + out)

    def self_attention(queries: Tensor) -> Tensor:
        if block.skip_first_layer_pe:
            queries = block.self_attn(q=queries, k=queries, v=queries)
        else:
            q = queries + query_pe
            queries = queries + block.self_attn(q=q, k=q, v=queries)
        return block.norm1(queries)

    if order == "sam":
        queries = token_to_image(self_attention(queries))
    else:
        queries = self_attention(token_to_image(queries))
    queries = block.norm3(queries + block.mlp(queries))
    q, k = queries + query_pe, keys + key_pe
    out = _attend(block.cross_attn_image_to_token, k, q, queries, None if prior is None else prior.transpose(1, 2))
    keys = block.norm4(keys + out)
    return queries, keys


def run_two_way(transformer: nn.Module, image_embedding: Tensor, image_pe: Tensor, tokens: Tensor,
                order: str = "sam", prior: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """A SAM-layout two-way transformer in ``order``.

    image_embedding: B x C x h x w; image_pe: 1 x C x h x w (or B x ...); tokens: B x T x C (also their PE);
    prior: optional B x T x (h*w) weights for the cross-attentions. Returns (tokens B x T x C, keys B x h*w x C).
    """
    b = image_embedding.shape[0]
    keys = image_embedding.flatten(2).transpose(1, 2)
    key_pe = image_pe.flatten(2).transpose(1, 2).expand(b, -1, -1)
    queries = tokens
    for layer in transformer.layers:
        queries, keys = run_block(layer, queries, keys, tokens, key_pe, order, prior)
    out = transformer.final_attn_token_to_image(q=queries + tokens, k=keys + key_pe, v=keys)
    queries = transformer.norm_final_attn(queries + out)
    return queries, keys
