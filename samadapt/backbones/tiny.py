"""A tiny random-init SAM for tests: 64 px input, 16 x 16 embedding grid, a forward in milliseconds on CPU.

It is built from ``segment-anything``'s own modules (ImageEncoderViT, PromptEncoder, MaskDecoder) so that code
tested on it runs unchanged on the real backbones. Layers: its 4 ViT blocks (NHWC 16 x 16 x 64; global attention at
1 and 3), each one a "stage"; default intermediates: blocks 0, 1, 2 (role ``late_stages``: 1, 2, 3).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from . import BACKBONES
from .base import Backbone, EncoderStep
from .sam import vit_steps


@BACKBONES.register
class TinySAM(Backbone):
    name = "tiny"
    input_size = 64
    embed_grid = (16, 16)
    layer_widths = (64, 64, 64, 64)
    intermediate_layers = (0, 1, 2)
    stage_end_layers = (0, 1, 2, 3)
    lora_targets = ("blocks.*.attn.qkv",)
    """Every ViT block's fused qkv projection (laid out q | k | v, as SAM's ViT)."""

    def layer_modules(self) -> list[nn.Module]:
        return list(self.image_encoder.blocks)

    def _hook_output_to_nchw(self, index: int, output: Tensor) -> Tensor:
        return output.permute(0, 3, 1, 2)

    def encoder_steps(self, encoder: nn.Module) -> list[EncoderStep]:
        return vit_steps(encoder)

    @classmethod
    def build(cls, checkpoint: str | None = None, seed: int = 0) -> "TinySAM":
        """A random-init tiny SAM, seeded (``weights_id`` ``random-<seed>``), or the weights of ``checkpoint``."""
        from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, TwoWayTransformer

        from ..state_dicts import load_state_checked
        from .weights import read_torch_checkpoint

        with torch.random.fork_rng():
            torch.manual_seed(seed)
            encoder = ImageEncoderViT(
                img_size=64, patch_size=4, embed_dim=64, depth=4, num_heads=2, out_chans=256,
                use_rel_pos=True, window_size=4, global_attn_indexes=(1, 3),
            )
            prompt_encoder = PromptEncoder(
                embed_dim=256, image_embedding_size=(16, 16), input_image_size=(64, 64), mask_in_chans=16
            )
            decoder = MaskDecoder(
                transformer_dim=256,
                transformer=TwoWayTransformer(depth=2, embedding_dim=256, mlp_dim=512, num_heads=8),
                num_multimask_outputs=3, iou_head_depth=3, iou_head_hidden_dim=64,
            )
        model = cls(encoder, prompt_encoder, decoder, weights_id=f"random-{seed}")
        if checkpoint:
            load_state_checked(model, read_torch_checkpoint(checkpoint), checkpoint)
            from .base import file_sha256

            model.weights_id = file_sha256(checkpoint)
        return model
