"""A batched call of SAM's mask decoder that exposes its internals.

Meta's ``MaskDecoder.predict_masks`` repeats the image embedding once per prompt (one image, many prompts), so
a batch of B images with B prompt sets would become B x B. ``decode_masks`` runs the same modules (the
decoder's tokens, two-way transformer, upscaling, hypernetworks and IoU head) with one prompt set per image,
and returns what the methods need besides the masks: the transformer's token outputs, the prompt-attended image
tokens (DeSAM's mask embedding) and the upscaled embedding (H-SAM's skip).

``upscale`` runs a SAM-style ``output_upscaling`` (2x2 stride-2 transposed convolutions, LayerNorm2d, GELU) with
the same parameters on cheaper kernels: a stride-2 2x2 transposed convolution has no overlapping windows, so it is
one matrix product per pixel followed by a pixel shuffle, and LayerNorm2d is ``F.layer_norm`` over the channels of
a channels-last view (one fused kernel instead of SAM's five elementwise passes, each kept for backward). Equal up
to float rounding; on a 2-core AVX2 CPU, forward + backward of the upscaling at 24 x 256 x 64 x 64 took 0.84x
the time of the stock modules (one thread, same run).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def _transposed_2x2(conv: nn.ConvTranspose2d, x: Tensor) -> Tensor:
    """``conv(x)`` for a 2x2, stride-2, unpadded transposed convolution: B x C x h x w -> B x O x 2h x 2w."""
    c, o = conv.in_channels, conv.out_channels  # module facts, constants in a traced graph
    h, w = x.shape[-2:]
    y = x.permute(0, 2, 3, 1).reshape(-1, c) @ conv.weight.reshape(c, o * 4)  # (B h w) x (O 2 2)
    # the batch stays -1: an ONNX export traces shapes as constants and keeps only the batch dynamic
    y = y.view(-1, h, w, o, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(-1, o, 2 * h, 2 * w)
    return y if conv.bias is None else y + conv.bias.view(1, -1, 1, 1)


def _is_transposed_2x2(m: nn.Module) -> bool:
    return (isinstance(m, nn.ConvTranspose2d) and m.kernel_size == (2, 2) and m.stride == (2, 2)
            and m.padding == (0, 0) and m.output_padding == (0, 0) and m.dilation == (1, 1) and m.groups == 1)


def upscale(layers: nn.Sequential, x: Tensor) -> Tensor:
    """``layers(x)`` (a SAM-style ``output_upscaling``) on the cheaper kernels of the module docstring; any other
    module in ``layers`` runs as it is. x: B x C x h x w."""
    for m in layers:
        if _is_transposed_2x2(m):
            x = _transposed_2x2(m, x)
        elif type(m).__name__ == "LayerNorm2d":  # segment-anything's and samadapt's: weight, bias, eps over dim 1
            x = F.layer_norm(x.permute(0, 2, 3, 1), (m.weight.numel(),), m.weight, m.bias, m.eps).permute(0, 3, 1, 2)
        else:
            x = m(x)
    return x


@dataclass
class DecoderOutput:
    """``masks``: B x M x 4h x 4w logits (M = all mask tokens); ``iou``: B x M;
    ``tokens``: B x T x C transformer token outputs (0 = IoU token, 1..M mask tokens, then prompts);
    ``image_tokens``: B x C x h x w prompt-attended image embedding; ``upscaled``: B x C' x 4h x 4w."""

    masks: Tensor
    iou: Tensor
    tokens: Tensor
    image_tokens: Tensor
    upscaled: Tensor

    def select(self, multimask: bool) -> tuple[Tensor, Tensor]:
        """SAM's output choice: mask 0 (single) or masks 1..3 (multimask), with their IoU."""
        sl = slice(1, None) if multimask else slice(0, 1)
        return self.masks[:, sl], self.iou[:, sl]


def decode_masks(
    decoder: nn.Module,
    image_embeddings: Tensor,
    image_pe: Tensor,
    sparse: Tensor,
    dense: Tensor,
    mask_token_offsets: Tensor | None = None,
) -> DecoderOutput:
    """Run ``decoder`` (a SAM ``MaskDecoder``) with one prompt set per image.

    image_embeddings: B x C x h x w; image_pe: 1 x C x h x w; sparse: B x N x C (N may be 0);
    dense: B x C x h x w (or 1 x C x h x w, broadcast); mask_token_offsets: optional B x M x C added to the
    learned mask tokens per image (ProMISe's IPS).
    """
    b, c, h, w = image_embeddings.shape
    mask_tokens = decoder.mask_tokens.weight.unsqueeze(0).expand(b, -1, -1)
    if mask_token_offsets is not None:
        mask_tokens = mask_tokens + mask_token_offsets
    iou_token = decoder.iou_token.weight.unsqueeze(0).expand(b, -1, -1)
    tokens = torch.cat([iou_token, mask_tokens, sparse.to(image_embeddings.dtype)], dim=1)

    src = image_embeddings + dense
    pos = image_pe.expand(b, -1, -1, -1)
    hs, src_tokens = decoder.transformer(src, pos, tokens)
    m = decoder.num_mask_tokens
    mask_out = hs[:, 1 : 1 + m]

    image_tokens = src_tokens.transpose(1, 2).reshape(b, c, h, w)
    upscaled = upscale(decoder.output_upscaling, image_tokens)
    hyper = torch.stack([decoder.output_hypernetworks_mlps[i](mask_out[:, i]) for i in range(m)], dim=1)
    bu, cu, hu, wu = upscaled.shape
    masks = (hyper @ upscaled.reshape(bu, cu, hu * wu)).reshape(bu, m, hu, wu)
    iou = decoder.iou_prediction_head(hs[:, 0])
    return DecoderOutput(masks, iou, hs, image_tokens, upscaled)


def empty_sparse(batch: int, dim: int, like: Tensor) -> Tensor:
    """A B x 0 x C sparse prompt (no points, no box)."""
    return like.new_zeros(batch, 0, dim)
