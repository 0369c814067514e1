"""Many prompts on few images through a SAM mask decoder's two-way transformer, image-side work done once per image.

With one image and P prompts, SAM repeats the image embedding P times and runs every attention at full width on
each copy. Two exact rewrites (equal up to float rounding) make the P copies cheap:

- **Shared image side.** In the first two-way block (``skip_first_layer_pe``) the image tokens are still the
  prompt-independent ``src = embedding + dense`` (``dense`` = the no-mask embedding, shared by all prompts), so its
  token-to-image keys and values and its image-to-token queries are projected once per image (:func:`image_side`)
  and used by every prompt of that image without being repeated.
- **Folded projections.** Every attention between the few prompt tokens (T) and the many image tokens (L = h x w)
  is computed on the token side: a head's score ``(x W_q + b_q) . (y W_k + b_k)`` is ``x . (W_q^T (y W_k + b_k))``
  plus a per-token constant, and its value-then-output path ``softmax(.) (y W_v + b_v) W_o`` is
  ``softmax(.) (y W_v W_o) + b_v W_o`` (attention weights sum to 1 over the values). So the L x C image tokens
  are never projected per prompt (SAM: four L x C x C/2 products per block and prompt); each attention costs two
  L x C x (heads x T) products instead, and no per-head copy of the image tokens is made.

The decoder's ``output_upscaling`` and hypernetwork MLPs are not run (DeSAM's PRIM does not use them). The result
equals :func:`samadapt.layers.sam_decoder.decode_masks` on the repeated embedding (``tokens``, ``iou``,
``image_tokens``) up to float rounding (tests/methods/test_method_desam.py).

Shapes: N images, P prompts, T tokens (IoU + mask tokens + sparse prompt), C channels, L = h x w image tokens,
H heads of width d (the attention's internal width D = H x d).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import ConfigError


def image_side(decoder: nn.Module, embedding: Tensor, image_pe: Tensor, dense: Tensor) -> dict[str, Any]:
    """The prompt-independent part of the first block, per image.

    embedding: N x C x h x w; image_pe: 1 x C x h x w; dense: 1 x C x h x w (or N x ...). Returns ``src``
    (N x L x C), ``key_pe`` (1 x L x C) and the first block's projected ``t2i_k``, ``t2i_v``, ``i2t_q``
    (N x L x D), and ``grid`` (h, w).
    """
    block = decoder.transformer.layers[0]
    src = (embedding + dense).flatten(2).transpose(1, 2)
    key_pe = image_pe.flatten(2).transpose(1, 2)
    t2i, i2t = block.cross_attn_token_to_image, block.cross_attn_image_to_token
    with_pe = src + key_pe
    return {"src": src, "key_pe": key_pe, "t2i_k": t2i.k_proj(with_pe), "t2i_v": t2i.v_proj(src),
            "i2t_q": i2t.q_proj(with_pe), "grid": tuple(embedding.shape[-2:])}


def _per_head(x: Tensor, heads: int) -> Tensor:
    """P x T x D -> P x T x H x d (a view)."""
    return x.unflatten(-1, (heads, x.shape[-1] // heads))


def _value_out(module: nn.Module, values: Tensor) -> Tensor:
    """Token values through the value projection and each head's slice of the output projection:
    P x T x C -> P x (H T) x C (``(y W_v + b_v) W_o`` per head, without the output bias)."""
    heads = module.num_heads
    v = _per_head(module.v_proj(values), heads)  # P x T x H x d
    w_o = module.out_proj.weight.unflatten(1, (heads, -1))  # C x H x d
    return torch.einsum("pthd,chd->phtc", v, w_o).flatten(1, 2)


def tokens_to_image(module: nn.Module, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """A SAM ``Attention`` with few queries (tokens) and many keys (image tokens), projections folded into the
    token side. q: P x T x C; k, v: P x L x C -> P x T x C (equals ``module(q=q, k=k, v=v)``)."""
    heads = module.num_heads
    p, t, _ = q.shape
    qh = _per_head(module.q_proj(q), heads)  # P x T x H x d
    w_k = module.k_proj.weight.unflatten(0, (heads, -1))  # H x d x C
    folded = torch.einsum("pthd,hdc->phtc", qh, w_k).flatten(1, 2)  # P x HT x C
    # k's bias adds a constant per query, which the softmax cancels; kept so that it is trained as in SAM
    offset = torch.einsum("pthd,hd->pht", qh, module.k_proj.bias.unflatten(0, (heads, -1))).flatten(1)
    scores = (folded @ k.transpose(1, 2) + offset[..., None]) / math.sqrt(qh.shape[-1])  # P x HT x L
    attn = torch.softmax(scores, dim=-1)
    mixed = (attn @ v).unflatten(1, (heads, t))  # P x H x T x C
    w_v = module.v_proj.weight.unflatten(0, (heads, -1))  # H x d x C
    out = torch.einsum("phtc,hdc->pthd", mixed, w_v).flatten(2) + module.v_proj.bias
    return module.out_proj(out)


def _image_to_tokens_out(module: nn.Module, attn: Tensor, values: Tensor) -> Tensor:
    """Image-to-token output from the attention weights: attn P x (H T) x L (softmax over each head's T), values
    P x T x C (the tokens) -> P x L x C."""
    return attn.transpose(1, 2) @ _value_out(module, values) + module.out_proj.bias


def image_to_tokens(module: nn.Module, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """A SAM ``Attention`` with many queries (image tokens) and few keys (tokens), projections folded into the
    token side. q: P x L x C; k, v: P x T x C -> P x L x C (equals ``module(q=q, k=k, v=v)``)."""
    heads = module.num_heads
    p, t, _ = k.shape
    kh = _per_head(module.k_proj(k), heads)  # P x T x H x d
    w_q = module.q_proj.weight.unflatten(0, (heads, -1))  # H x d x C
    folded = torch.einsum("pthd,hdc->phtc", kh, w_q).flatten(1, 2)  # P x HT x C
    offset = torch.einsum("pthd,hd->pht", kh, module.q_proj.bias.unflatten(0, (heads, -1))).flatten(1)
    scores = (folded @ q.transpose(1, 2) + offset[..., None]) / math.sqrt(kh.shape[-1])  # P x HT x L
    attn = torch.softmax(scores.unflatten(1, (heads, t)), dim=2).flatten(1, 2)
    return _image_to_tokens_out(module, attn, v)


def _first_block(block: nn.Module, side: dict[str, Any], tokens: Tensor, groups: list[tuple[int, int, int]]
                 ) -> tuple[Tensor, Tensor]:
    """Block 0 (SAM order, ``skip_first_layer_pe``) with the shared image side. tokens: P x T x C, prompts sorted by
    image; groups: (image, start, end). Returns (queries P x T x C, keys P x L x C)."""
    queries = block.norm1(block.self_attn(q=tokens, k=tokens, v=tokens))
    t2i, i2t = block.cross_attn_token_to_image, block.cross_attn_image_to_token
    heads = t2i.num_heads
    p, t, _ = tokens.shape
    qh = _per_head(t2i.q_proj(queries + tokens), heads).permute(2, 0, 1, 3)  # H x P x T x d
    out = []
    for image, start, end in groups:  # the image's projected keys and values, shared by its prompts
        k = _per_head(side["t2i_k"][image], heads).permute(1, 2, 0)  # H x d x L
        v = _per_head(side["t2i_v"][image], heads).transpose(0, 1)  # H x L x d
        q = qh[:, start:end].flatten(1, 2)  # H x nT x d
        attn = torch.softmax(q @ k / math.sqrt(q.shape[-1]), dim=-1)
        out.append((attn @ v).unflatten(1, (end - start, t)))  # H x n x T x d
    out = t2i.out_proj(torch.cat(out, dim=1).permute(1, 2, 0, 3).flatten(2))
    queries = block.norm2(queries + out)
    queries = block.norm3(queries + block.mlp(queries))
    kh = _per_head(i2t.k_proj(queries + tokens), heads).permute(2, 0, 1, 3)  # H x P x T x d
    attn = torch.empty(p, heads, t, side["src"].shape[1], dtype=tokens.dtype, device=tokens.device)
    for image, start, end in groups:
        q = _per_head(side["i2t_q"][image], heads).transpose(0, 1)  # H x L x d
        k = kh[:, start:end].flatten(1, 2).transpose(1, 2)  # H x d x nT
        scores = (q @ k / math.sqrt(q.shape[-1])).unflatten(2, (end - start, t))  # H x L x n x T
        attn[start:end] = torch.softmax(scores, dim=-1).permute(2, 0, 3, 1)
    keys = _image_to_tokens_out(i2t, attn.flatten(1, 2), queries)
    for image, start, end in groups:
        keys[start:end] += side["src"][image]
    return queries, block.norm4(keys)


def _block(block: nn.Module, queries: Tensor, keys: Tensor, tokens: Tensor, key_pe: Tensor) -> tuple[Tensor, Tensor]:
    """A later two-way block (SAM order, with PE) with folded attentions; shapes as :func:`_first_block`."""
    q = queries + tokens
    queries = block.norm1(queries + block.self_attn(q=q, k=q, v=queries))
    with_pe = keys + key_pe
    queries = block.norm2(queries + tokens_to_image(block.cross_attn_token_to_image, queries + tokens, with_pe, keys))
    queries = block.norm3(queries + block.mlp(queries))
    out = image_to_tokens(block.cross_attn_image_to_token, with_pe, queries + tokens, queries)
    return queries, block.norm4(keys + out)


def decode_tokens(decoder: nn.Module, side: dict[str, Any], sparse: Tensor, index: Tensor, iou_only: bool = False
                  ) -> tuple[Tensor, Tensor, Tensor]:
    """P prompts against their images' :func:`image_side`.

    sparse: P x N_s x C prompt tokens; index: P (image of each prompt, any order; grouped prompts avoid a reorder).
    Returns (IoU P x M over all mask tokens, transformer tokens P x T x C, prompt-attended image tokens
    P x C x h x w, a view of the image tokens in their L x C layout). ``iou_only``: only the IoU token goes
    through the final token-to-image attention (all a caller of the IoU and the image tokens needs); the
    transformer tokens are then P x 1 x C.
    """
    layers = decoder.transformer.layers
    if not layers[0].skip_first_layer_pe or any(layer.skip_first_layer_pe for layer in layers[1:]):
        raise ConfigError("the first two-way block must skip the query PE and no other (SAM's layout)")
    order = torch.argsort(index, stable=True)
    grouped = bool((order == torch.arange(len(index), device=index.device)).all())
    if not grouped:
        sparse, index = sparse[order], index[order]
    images, counts = torch.unique_consecutive(index, return_counts=True)
    ends = torch.cumsum(counts, 0).tolist()
    groups = [(int(i), e - int(c), e) for i, c, e in zip(images.tolist(), counts.tolist(), ends)]
    p = sparse.shape[0]
    fixed = torch.cat([decoder.iou_token.weight, decoder.mask_tokens.weight], dim=0)
    tokens = torch.cat([fixed.unsqueeze(0).expand(p, -1, -1), sparse.to(side["src"].dtype)], dim=1)
    queries, keys = _first_block(layers[0], side, tokens, groups)
    key_pe = side["key_pe"]
    for layer in layers[1:]:
        queries, keys = _block(layer, queries, keys, tokens, key_pe)
    transformer = decoder.transformer
    if iou_only:
        queries, tokens = queries[:, :1], tokens[:, :1]
    out = tokens_to_image(transformer.final_attn_token_to_image, queries + tokens, keys + key_pe, keys)
    hs = transformer.norm_final_attn(queries + out)
    iou = decoder.iou_prediction_head(hs[:, 0])
    if not grouped:
        back = torch.argsort(order)
        iou, hs, keys = iou[back], hs[back], keys[back]
    h, w = side["grid"]
    return iou, hs, keys.transpose(1, 2).unflatten(2, (h, w))
