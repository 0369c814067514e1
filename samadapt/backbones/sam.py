"""Meta's Segment Anything ViT-B/L/H (``segment-anything`` package) behind the samadapt backbone interface.

Input: 1024 x 1024 RGB in [0, 1], scaled to 0-255 and normalised with SAM's mean/std. Embedding grid 64 x 64.
Layers: every ViT block (NHWC, returned NCHW with the encoder's width 768 / 1024 / 1280); the stage ends are the
four global-attention blocks (ViT-B 2, 5, 8, 11; ViT-L 5, 11, 17, 23; ViT-H 7, 15, 23, 31), also role
``global_attention``. Default intermediates: the first three of them (ViT-B 2, 5, 8).

Weights, in this order: ``checkpoint=PATH`` (the CLI's ``--checkpoint``); ``cache_dir()/<Meta's file name>``;
else a download from Meta's URL into the cache, verified against the size and SHA-256 in ``SAM_CHECKPOINTS``.
``SAMADAPT_SAM_BASE_URL`` replaces Meta's base URL (a mirror; the tests use a ``file://`` folder).

``input_size`` other than 1024 (a multiple of 16, e.g. SAMed's 512) keeps the pretrained weights and resamples
the absolute position embedding (bicubic) and the global-attention relative position tables (linear, as
``segment-anything`` itself does at run time) to the new token grid; the prompt encoder is told the new sizes.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import CheckpointError, ConfigError
from ..state_dicts import load_state_checked
from .weights import cache_dir, download_file, read_torch_checkpoint
from . import BACKBONES
from .base import Backbone, EncoderStep, file_sha256

META_BASE_URL = "https://dl.fbaipublicfiles.com/segment_anything/"
BASE_URL_ENV = "SAMADAPT_SAM_BASE_URL"


@dataclass(frozen=True)
class SamCheckpointInfo:
    """Where a SAM checkpoint comes from and what it must hash to.

    ``sha256``/``size`` are ``None`` when unknown: the download is then accepted with a logged warning.
    ``url=None`` means ``base_url + filename`` (``base_url`` is Meta's, or ``$SAMADAPT_SAM_BASE_URL``).
    """

    filename: str
    sha256: str | None
    size: int | None
    url: str | None = None

    def resolved_url(self) -> str:
        if self.url:
            return self.url
        base = os.environ.get(BASE_URL_ENV) or META_BASE_URL
        return base.rstrip("/") + "/" + self.filename


# Meta publishes the URLs (segment-anything README, "Model Checkpoints") but no checksums. The SHA-256 and byte
# sizes below are the values that many independent projects pin for these exact URLs (e.g. micro-sam's model
# registry, the 3D Slicer SAM extension, Fooocus/ComfyUI model manifests, wget logs of the ViT-B download), found
# identical across them; the file names' hex suffixes are the prefixes of the files' MD5 digests (01ec64d2...,
# 0b319550..., 4b8939a8...), which those projects also agree on. They were not recomputed here (no network).
# Tests and mirrors override entries of this table (``dataclasses.replace``) or set ``$SAMADAPT_SAM_BASE_URL``.
SAM_CHECKPOINTS: dict[str, SamCheckpointInfo] = {
    "sam_vit_b": SamCheckpointInfo(
        "sam_vit_b_01ec64.pth", "ec2df62732614e57411cdcf32a23ffdf28910380d03139ee0f4fcbe91eb8c912", 375_042_383),
    "sam_vit_l": SamCheckpointInfo(
        "sam_vit_l_0b3195.pth", "3adcc4315b642a4d2101128f611684e8734c41232a17c648ed1693702a49a622", 1_249_524_607),
    "sam_vit_h": SamCheckpointInfo(
        "sam_vit_h_4b8939.pth", "a7bf3b02f3ebf1267aba913ff637d9a2d5c33d3173bb679e46d9f338c26f262e", 2_564_550_879),
}

_REGISTRY_KEYS = {"sam_vit_b": "vit_b", "sam_vit_l": "vit_l", "sam_vit_h": "vit_h"}
_WIDTH_TO_NAME = {768: "sam_vit_b", 1024: "sam_vit_l", 1280: "sam_vit_h"}
PIXEL_MEAN = (123.675, 116.28, 103.53)
PIXEL_STD = (58.395, 57.12, 57.375)
NATIVE_SIZE = 1024
PATCH = 16


class SamViT(Backbone):
    """SAM ViT-B/L/H. Sizes are per instance (they follow the encoder actually built)."""

    lora_targets = ("blocks.*.attn.qkv",)
    """Every ViT block's fused qkv projection (``ImageEncoderViT``), output laid out q | k | v."""

    def __init__(self, sam: nn.Module, weights_id: str):
        super().__init__(sam.image_encoder, sam.prompt_encoder, sam.mask_decoder, weights_id=weights_id,
                         pixel_mean=PIXEL_MEAN, pixel_std=PIXEL_STD, pixel_scale=255.0)
        encoder = sam.image_encoder
        global_blocks = [i for i, blk in enumerate(encoder.blocks) if blk.window_size == 0]
        self.intermediate_blocks: tuple[int, ...] = tuple(global_blocks[:3])
        self.intermediate_layers = self.intermediate_blocks
        self.stage_end_layers = tuple(global_blocks)
        width = int(encoder.pos_embed.shape[-1])
        self.layer_widths = (width,) * len(encoder.blocks)
        grid = int(encoder.pos_embed.shape[1])
        self.embed_grid = (grid, grid)
        self.input_size = grid * PATCH

    def layer_modules(self) -> list[nn.Module]:
        return list(self.image_encoder.blocks)

    def layer_roles(self) -> dict[str, tuple[int, ...]]:
        return {**super().layer_roles(), "global_attention": self.stage_end_layers}

    def _hook_output_to_nchw(self, index: int, output: Tensor) -> Tensor:
        return output.permute(0, 3, 1, 2)

    def encoder_steps(self, encoder: nn.Module) -> list[EncoderStep]:
        return vit_steps(encoder)

    def describe(self) -> dict:
        info = super().describe()
        info["intermediate_blocks"] = list(self.intermediate_blocks)
        return info

    @classmethod
    def build(cls, checkpoint: str | None = None, **kwargs) -> "SamViT":
        """This size of SAM; keyword arguments as ``build_sam_backbone``."""
        return build_sam_backbone(cls.name, checkpoint, **kwargs)


@BACKBONES.register
class SamViTB(SamViT):
    """SAM ViT-B (91M parameters)."""

    name = "sam_vit_b"


@BACKBONES.register
class SamViTL(SamViT):
    """SAM ViT-L (308M parameters)."""

    name = "sam_vit_l"


@BACKBONES.register
class SamViTH(SamViT):
    """SAM ViT-H (636M parameters)."""

    name = "sam_vit_h"


def resolve_sam_checkpoint(name: str, checkpoint: str | os.PathLike | None = None, download: bool = True,
                           progress: bool = True) -> Path:
    """The checkpoint file for backbone ``name``: ``checkpoint`` if given, else the cached file, else download it.

    Raises ``CheckpointError`` naming the file (given path missing) or the URL (download failed / mismatched).
    """
    if checkpoint is not None:
        path = Path(checkpoint).expanduser()
        if not path.is_file():
            raise CheckpointError(f"{path}: checkpoint file not found (given as the {name} checkpoint)")
        return path
    info = SAM_CHECKPOINTS[name]
    cached = cache_dir() / info.filename
    if cached.is_file():
        return cached
    url = info.resolved_url()
    if not download:
        raise CheckpointError(
            f"{cached}: {name} weights not found; pass --checkpoint PATH, put {info.filename} in "
            f"{cache_dir()} ($SAMADAPT_HOME), or allow the download from {url}")
    try:
        return download_file(url, cached, sha256=info.sha256, size=info.size, progress=progress)
    except CheckpointError as exc:
        raise CheckpointError(
            f"{exc} -- pass --checkpoint PATH or put {info.filename} in {cache_dir()} ($SAMADAPT_HOME)") from exc


def _check_architecture(name: str, state: dict[str, Tensor], source: str) -> None:
    """Name the architecture a SAM checkpoint was made for when it is not ``name`` (clearer than shape lists)."""
    pos = state.get("image_encoder.pos_embed")
    if pos is None or pos.dim() != 4:
        return  # not a SAM-layout checkpoint: load_state_checked lists the keys
    depth = len({k.split(".")[2] for k in state if k.startswith("image_encoder.blocks.")})
    width = int(pos.shape[-1])
    found = _WIDTH_TO_NAME.get(width)
    expected_width = {v: k for k, v in _WIDTH_TO_NAME.items()}[name]
    if width != expected_width:
        what = f"a {found} checkpoint" if found else "a checkpoint for another ViT"
        raise CheckpointError(
            f"{source}: {what} (encoder width {width}, {depth} blocks); backbone {name} needs width "
            f"{expected_width}. Choose the matching backbone or checkpoint.")


def vit_steps(encoder: nn.Module) -> list[EncoderStep]:
    """``segment-anything``'s ``ImageEncoderViT.forward`` as steps: patch embedding + absolute position embedding
    (B x g x g x D), every block (NHWC), the neck (-> B x 256 x g x g)."""

    def embed(x: Tensor) -> Tensor:
        x = encoder.patch_embed(x)
        return x if encoder.pos_embed is None else x + encoder.pos_embed

    steps = [EncoderStep(("patch_embed", "pos_embed"), embed)]
    steps += [EncoderStep((f"blocks.{i}",), blk) for i, blk in enumerate(encoder.blocks)]
    return steps + [EncoderStep(("neck",), lambda x: encoder.neck(x.permute(0, 3, 1, 2)))]


def resize_sam_input(sam: nn.Module, input_size: int) -> None:
    """Adapt a built SAM (weights loaded) to ``input_size`` px in place; see the module docstring."""
    if input_size % PATCH or input_size < PATCH:
        raise ConfigError(f"input_size must be a positive multiple of {PATCH}, got {input_size}")
    encoder = sam.image_encoder
    grid = input_size // PATCH
    old = int(encoder.pos_embed.shape[1])
    if grid == old:
        return
    with torch.no_grad():
        pos = encoder.pos_embed.permute(0, 3, 1, 2)  # 1 x C x g x g
        pos = F.interpolate(pos, size=(grid, grid), mode="bicubic", align_corners=False, antialias=grid < old)
        encoder.pos_embed = nn.Parameter(pos.permute(0, 2, 3, 1).contiguous(),
                                         requires_grad=encoder.pos_embed.requires_grad)
        for blk in encoder.blocks:
            if blk.window_size != 0 or not getattr(blk.attn, "use_rel_pos", False):
                continue
            for attr in ("rel_pos_h", "rel_pos_w"):
                table = getattr(blk.attn, attr)  # (2g-1) x head_dim
                new = F.interpolate(table.t().unsqueeze(0), size=2 * grid - 1, mode="linear", align_corners=False)
                setattr(blk.attn, attr, nn.Parameter(new.squeeze(0).t().contiguous(),
                                                     requires_grad=table.requires_grad))
    encoder.img_size = input_size
    pe = sam.prompt_encoder
    pe.input_image_size = (input_size, input_size)
    pe.image_embedding_size = (grid, grid)
    pe.mask_input_size = (4 * grid, 4 * grid)


def build_sam_backbone(
    name: str,
    checkpoint: str | os.PathLike | None = None,
    pretrained: bool = True,
    input_size: int = NATIVE_SIZE,
    download: bool = True,
    progress: bool = True,
    seed: int = 0,
) -> SamViT:
    """Build ``sam_vit_b|l|h``.

    ``pretrained=False`` (and no ``checkpoint``) keeps ``segment-anything``'s random init, seeded (``weights_id``
    ``random-<seed>``); it also works under ``with torch.device("meta")`` to inspect ViT-L/H without memory.
    Otherwise weights come from ``resolve_sam_checkpoint`` and load through ``load_state_checked`` (missing,
    unexpected or mis-shaped keys raise ``CheckpointError``); ``weights_id`` is the file's SHA-256.
    """
    from segment_anything import sam_model_registry

    if name not in _REGISTRY_KEYS:
        raise ConfigError(f"unknown SAM backbone {name!r}; expected one of {', '.join(_REGISTRY_KEYS)}")
    path = weights_id = None
    if pretrained or checkpoint is not None:  # find (or download) and verify the file before building anything
        path = resolve_sam_checkpoint(name, checkpoint, download=download, progress=progress)
        weights_id = file_sha256(path)
        known = SAM_CHECKPOINTS[name]
        if checkpoint is None and known.sha256 and weights_id != known.sha256:
            raise CheckpointError(
                f"{path}: SHA-256 {weights_id} differs from Meta's {name} file ({known.sha256}); the cached "
                f"file is corrupt or not Meta's: delete it to download again, or pass it with --checkpoint")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        sam = sam_model_registry[_REGISTRY_KEYS[name]](checkpoint=None)
    if path is not None:
        state = read_torch_checkpoint(path)
        _check_architecture(name, state, str(path))
        load_state_checked(sam, state, str(path))
    else:
        weights_id = f"random-{seed}"
    resize_sam_input(sam, input_size)
    return BACKBONES.get(name)(sam, weights_id=weights_id)

