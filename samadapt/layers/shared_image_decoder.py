"""Many prompts on few images through a SAM mask decoder's two-way transformer, image-side work done once per image.

With one image and P prompts, SAM repeats the image embedding P times. In the first two-way block
(``skip_first_layer_pe``) the image tokens are still the prompt-independent ``src = embedding + dense`` (``dense`` =
the no-mask embedding, shared by all prompts), so three of its four image-side projections (token-to-image keys and
values, image-to-token queries) are computed once per image here and shared by its prompts; only the image-to-token
output projection and everything after the first block run per prompt. The decoder's ``output_upscaling`` and
hypernetwork MLPs are not run (DeSAM's PRIM does not use them). The result equals
:func:`samadapt.layers.sam_decoder.decode_masks` on the repeated embedding (``tokens``, ``iou``, ``image_tokens``),
up to float rounding.

Shapes: N images, P prompts, T tokens (IoU + mask tokens + sparse prompt), C channels, h x w embedding grid.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import ConfigError
from .two_way import run_block


def _heads(x: Tensor, heads: int) -> Tensor:
    """B x L x D -> B x heads x L x D/heads."""
    b, n, d = x.shape
    return x.reshape(b, n, heads, d // heads).transpose(1, 2)


def _attend_projected(module: nn.Module, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """A SAM ``Attention`` on already projected q (B x Lq x D), k/v (B x Lk x D) -> B x Lq x C (``out_proj``)."""
    heads = module.num_heads
    qh, kh, vh = _heads(q, heads), _heads(k, heads), _heads(v, heads)
    attn = torch.softmax(qh @ kh.transpose(-2, -1) / math.sqrt(qh.shape[-1]), dim=-1)
    out = (attn @ vh).transpose(1, 2)
    return module.out_proj(out.reshape(out.shape[0], out.shape[1], -1))


def image_side(decoder: nn.Module, embedding: Tensor, image_pe: Tensor, dense: Tensor) -> dict[str, Any]:
    """The prompt-independent part of the first block, per image.

    embedding: N x C x h x w; image_pe: 1 x C x h x w; dense: 1 x C x h x w (or N x ...). Returns ``src``
    (N x hw x C), ``key_pe`` (1 x hw x C) and the first block's projected ``t2i_k``, ``t2i_v``, ``i2t_q``
    (N x hw x D), and ``grid`` (h, w).
    """
    block = decoder.transformer.layers[0]
    src = (embedding + dense).flatten(2).transpose(1, 2)
    key_pe = image_pe.flatten(2).transpose(1, 2)
    t2i, i2t = block.cross_attn_token_to_image, block.cross_attn_image_to_token
    with_pe = src + key_pe
    return {"src": src, "key_pe": key_pe, "t2i_k": t2i.k_proj(with_pe), "t2i_v": t2i.v_proj(src),
            "i2t_q": i2t.q_proj(with_pe), "grid": tuple(embedding.shape[-2:])}


def decode_tokens(decoder: nn.Module, side: dict[str, Any], sparse: Tensor, index: Tensor
                  ) -> tuple[Tensor, Tensor, Tensor]:
    """P prompts against their images' :func:`image_side`.

    sparse: P x N_s x C prompt tokens; index: P (image of each prompt). Returns (IoU P x M over all mask tokens,
    transformer tokens P x T x C, prompt-attended image tokens P x C x h x w).
    """
    block0 = decoder.transformer.layers[0]
    if not block0.skip_first_layer_pe:
        raise ConfigError("the first two-way block must skip the query PE (SAM's layout)")
    p = sparse.shape[0]
    src = side["src"][index]
    fixed = torch.cat([decoder.iou_token.weight, decoder.mask_tokens.weight], dim=0)
    tokens = torch.cat([fixed.unsqueeze(0).expand(p, -1, -1), sparse.to(src.dtype)], dim=1)
    # block 0, the SAM order, with the shared image-side projections
    queries = block0.norm1(block0.self_attn(q=tokens, k=tokens, v=tokens))
    t2i = block0.cross_attn_token_to_image
    out = _attend_projected(t2i, t2i.q_proj(queries + tokens), side["t2i_k"][index], side["t2i_v"][index])
    queries = block0.norm2(queries + out)
    queries = block0.norm3(queries + block0.mlp(queries))
    i2t = block0.cross_attn_image_to_token
    with_pe = queries + tokens
    out = _attend_projected(i2t, side["i2t_q"][index], i2t.k_proj(with_pe), i2t.v_proj(queries))
    keys = block0.norm4(src + out)
    key_pe = side["key_pe"].expand(p, -1, -1)
    for layer in decoder.transformer.layers[1:]:
        queries, keys = run_block(layer, queries, keys, tokens, key_pe, "sam")
    transformer = decoder.transformer
    out = transformer.final_attn_token_to_image(q=queries + tokens, k=keys + key_pe, v=keys)
    hs = transformer.norm_final_attn(queries + out)
    h, w = side["grid"]
    image_tokens = keys.transpose(1, 2).reshape(p, keys.shape[-1], h, w)
    return decoder.iou_prediction_head(hs[:, 0]), hs, image_tokens

