"""SAM-Med3D (Wang et al. 2023; "vit_b_ori", the backbone of M-SAM's release): a volumetric SAM at 128^3.

Shapes for the official size (``SamMed3D.build()``): input ``B x 1 x 128 x 128 x 128`` (one channel, already
normalised: the release clamps CT to [-1000, 1000] and z-normalises; ``preprocess`` is the identity), patch 16 ->
8^3 tokens of width 768, 12 blocks, 12 heads, window 14 (windows pad the 8^3 grid to 14^3, so the windowed blocks'
rel-pos tables are 27 x 64) with global attention at blocks 2, 5, 8, 11 (tables 15 x 64), neck 1x1x1 conv ->
LayerNorm3d -> 3x3x3 conv -> LayerNorm3d -> embedding ``B x 384 x 8 x 8 x 8``. Prompt encoder: random Fourier PE of
384 // 3 = 128 frequencies giving ``[sin, cos, sin]`` (384 channels, as released); point prompts ``B x N x 3`` in
voxel units of the 128^3 input (the release's axis order: the dense PE's first two channels of position are grid
axes 1 and 0, see ``PromptEncoder3D.dense_pe``), labels 1 / 0 / -1 (padding); masks ``B x 1 x 32^3`` low-res logits
through ``mask_downscaling`` -> ``B x 384 x 8^3``. Mask decoder: SAM's two-way transformer (depth 2, 8 heads, MLP
2048) over the 512 flattened tokens, 3D transposed-conv upscaling x4 -> low-res logits ``B x {1|3} x 32^3``.

State-dict keys are the official ones (``image_encoder.blocks.0.attn.rel_pos_d``, ``prompt_encoder.mask_downscaling.0
.weight``, ``mask_decoder.output_upscaling.0.weight``, ...), so ``SamMed3D.build(checkpoint=PATH)`` loads
``sam_med3d.pth`` / ``sam_med3d_turbo.pth`` (its ``model_state_dict``) and any missing, extra or mis-shaped key is a
one-line ``CheckpointError``. The weights are not downloaded (give the path). Box prompts are not supported (the
release's box embedding indexes point embeddings it does not build). ``build(**size)`` makes smaller random models
(the tests' tiny 3D config).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import ConfigError
from . import BACKBONES
from .base import Backbone


class LayerNorm3d(nn.Module):
    """LayerNorm over the channels of B x C x D x H x W (``weight``, ``bias`` of C; eps 1e-6 as released)."""

    def __init__(self, channels: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        return F.layer_norm(x.movedim(1, -1), (x.shape[1],), self.weight, self.bias, self.eps).movedim(-1, 1)


class _MLPBlock(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.lin1 = nn.Linear(dim, hidden)
        self.lin2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.lin2(F.gelu(self.lin1(x)))


def _rel_pos(table: Tensor, size: int) -> Tensor:
    """size x size x C embeddings of the offsets i - k, the table resampled linearly to 2 size - 1 rows if needed."""
    if table.shape[0] != 2 * size - 1:
        table = F.interpolate(table.t()[None], size=2 * size - 1, mode="linear")[0].t()
    coords = torch.arange(size, device=table.device)
    return table[coords[:, None] - coords[None, :] + size - 1]


class Attention3D(nn.Module):
    """Multi-head self-attention over B x D x H x W x C tokens with decomposed 3D relative positions."""

    def __init__(self, dim: int, num_heads: int, grid: tuple[int, int, int]):
        super().__init__()
        self.num_heads = num_heads
        head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=True)
        self.proj = nn.Linear(dim, dim)
        self.rel_pos_d = nn.Parameter(torch.zeros(2 * grid[0] - 1, head_dim))
        self.rel_pos_h = nn.Parameter(torch.zeros(2 * grid[1] - 1, head_dim))
        self.rel_pos_w = nn.Parameter(torch.zeros(2 * grid[2] - 1, head_dim))

    def forward(self, x: Tensor) -> Tensor:
        b, d, h, w, c = x.shape
        n, nh = d * h * w, self.num_heads
        q, k, v = self.qkv(x).reshape(b, n, 3, nh, c // nh).permute(2, 0, 3, 1, 4).unbind(0)  # B x nh x N x hd
        qg = q.reshape(b, nh, d, h, w, -1)
        rd = torch.einsum("bndhwc,dkc->bndhwk", qg, _rel_pos(self.rel_pos_d, d))
        rh = torch.einsum("bndhwc,hkc->bndhwk", qg, _rel_pos(self.rel_pos_h, h))
        rw = torch.einsum("bndhwc,wkc->bndhwk", qg, _rel_pos(self.rel_pos_w, w))
        bias = (rd[..., :, None, None] + rh[..., None, :, None] + rw[..., None, None, :]).reshape(b, nh, n, n)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        return self.proj(out.transpose(1, 2).reshape(b, d, h, w, c))


def _windows(x: Tensor, size: int) -> tuple[Tensor, tuple[int, int, int]]:
    """B x D x H x W x C -> (B * windows) x size^3 x C after zero-padding each axis to a multiple of ``size``."""
    b, d, h, w, c = x.shape
    pd, ph, pw = (-d) % size, (-h) % size, (-w) % size
    x = F.pad(x, (0, 0, 0, pw, 0, ph, 0, pd))
    dp, hp, wp = d + pd, h + ph, w + pw
    x = x.view(b, dp // size, size, hp // size, size, wp // size, size, c).permute(0, 1, 3, 5, 2, 4, 6, 7)
    return x.reshape(-1, size, size, size, c), (dp, hp, wp)


def _unwindow(x: Tensor, size: int, padded: tuple[int, int, int], shape: tuple[int, int, int]) -> Tensor:
    dp, hp, wp = padded
    b = x.shape[0] // ((dp // size) * (hp // size) * (wp // size))
    x = x.view(b, dp // size, hp // size, wp // size, size, size, size, -1).permute(0, 1, 4, 2, 5, 3, 6, 7)
    x = x.reshape(b, dp, hp, wp, -1)
    return x[:, :shape[0], :shape[1], :shape[2]].contiguous()


class Block3D(nn.Module):
    """Pre-norm ViT block; ``window`` > 0 attends within zero-padded window^3 windows, 0 globally."""

    def __init__(self, dim: int, num_heads: int, grid: tuple[int, int, int], window: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.window = window
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention3D(dim, num_heads, (window,) * 3 if window else grid)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = _MLPBlock(dim, int(dim * mlp_ratio))

    def forward(self, x: Tensor) -> Tensor:
        y = self.norm1(x)
        if self.window:
            shape = tuple(y.shape[1:4])
            y, padded = _windows(y, self.window)
            y = _unwindow(self.attn(y), self.window, padded, shape)
        else:
            y = self.attn(y)
        x = x + y
        return x + self.mlp(self.norm2(x))


class ImageEncoderViT3D(nn.Module):
    """B x 1 x S^3 -> B x out x (S/patch)^3 (see the module docstring)."""

    def __init__(self, input_size: int, patch: int, width: int, depth: int, heads: int, out: int, window: int,
                 global_blocks: tuple[int, ...]):
        super().__init__()
        g = input_size // patch
        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Conv3d(1, width, patch, stride=patch)
        self.pos_embed = nn.Parameter(torch.zeros(1, g, g, g, width))
        self.blocks = nn.ModuleList(Block3D(width, heads, (g, g, g), 0 if i in global_blocks else window)
                                    for i in range(depth))
        self.neck = nn.Sequential(nn.Conv3d(width, out, 1, bias=False), LayerNorm3d(out),
                                  nn.Conv3d(out, out, 3, padding=1, bias=False), LayerNorm3d(out))

    def forward(self, x: Tensor) -> Tensor:
        x = self.patch_embed.proj(x).permute(0, 2, 3, 4, 1) + self.pos_embed
        for block in self.blocks:
            x = block(x)
        return self.neck(x.permute(0, 4, 1, 2, 3))


class _RandomPE3D(nn.Module):
    def __init__(self, feats: int):
        super().__init__()
        self.register_buffer("positional_encoding_gaussian_matrix", torch.randn(3, feats))

    def encode(self, coords: Tensor) -> Tensor:
        """... x 3 coordinates in [0, 1] -> ... x 3 feats: [sin, cos, sin] of the projected coordinates (release)."""
        z = 2 * math.pi * ((2 * coords - 1) @ self.positional_encoding_gaussian_matrix)
        return torch.cat([torch.sin(z), torch.cos(z), torch.sin(z)], dim=-1)


class PromptEncoder3D(nn.Module):
    """Points (B x N x 3 voxel coordinates, B x N labels) and low-res masks (B x 1 x (4g)^3) -> sparse B x N' x C,
    dense B x C x g^3."""

    def __init__(self, dim: int, grid: int, input_size: int, mask_chans: int = 16):
        super().__init__()
        self.dim, self.grid, self.input_size = dim, grid, input_size
        self.pe_layer = _RandomPE3D(dim // 3)
        self.point_embeddings = nn.ModuleList(nn.Embedding(1, dim) for _ in range(2))
        self.not_a_point_embed = nn.Embedding(1, dim)
        self.mask_downscaling = nn.Sequential(
            nn.Conv3d(1, mask_chans // 4, 2, stride=2), LayerNorm3d(mask_chans // 4), nn.GELU(),
            nn.Conv3d(mask_chans // 4, mask_chans, 2, stride=2), LayerNorm3d(mask_chans), nn.GELU(),
            nn.Conv3d(mask_chans, dim, 1))
        self.no_mask_embed = nn.Embedding(1, dim)

    def get_dense_pe(self) -> Tensor:
        """1 x C x g x g x g: the PE of every embedding voxel centre, coordinates (axis 1, axis 0, axis 2) / g."""
        g = self.grid
        centres = (torch.arange(g, device=self.no_mask_embed.weight.device, dtype=torch.float32) + 0.5) / g
        a0, a1, a2 = torch.meshgrid(centres, centres, centres, indexing="ij")
        return self.pe_layer.encode(torch.stack([a1, a0, a2], dim=-1)).permute(3, 0, 1, 2)[None]

    def forward(self, points: tuple[Tensor, Tensor] | None = None, boxes: Tensor | None = None,
                masks: Tensor | None = None) -> tuple[Tensor, Tensor]:
        if boxes is not None:
            raise ConfigError("sam_med3d takes point and mask prompts, not boxes")
        weight = self.no_mask_embed.weight
        b = points[0].shape[0] if points is not None else (masks.shape[0] if masks is not None else 1)
        sparse = weight.new_zeros(b, 0, self.dim)
        if points is not None:
            coords, labels = points
            coords = torch.cat([coords + 0.5, coords.new_zeros(b, 1, 3)], dim=1) / self.input_size
            labels = torch.cat([labels, labels.new_full((b, 1), -1)], dim=1)[..., None]
            emb = self.pe_layer.encode(coords.float())
            emb = torch.where(labels == -1, self.not_a_point_embed.weight, emb)
            emb = emb + torch.where(labels == 0, self.point_embeddings[0].weight, 0.0)
            sparse = emb + torch.where(labels == 1, self.point_embeddings[1].weight, 0.0)
        if masks is not None:
            dense = self.mask_downscaling(masks)
        else:
            dense = weight.reshape(1, -1, 1, 1, 1).expand(b, -1, self.grid, self.grid, self.grid)
        return sparse, dense


class MaskDecoder3D(nn.Module):
    """(src B x C x g^3 = image embedding + dense prompt, or M-SAM's MEA output; PE 1 x C x g^3; sparse B x N x C)
    -> low-res logits B x 4 x (4g)^3 and IoU predictions B x 4 (``decode``; ``forward`` selects as SAM)."""

    def __init__(self, dim: int, mlp_dim: int = 2048, iou_hidden: int = 256, num_multimask: int = 3):
        super().__init__()
        from segment_anything.modeling import TwoWayTransformer
        from segment_anything.modeling.mask_decoder import MLP

        self.transformer = TwoWayTransformer(depth=2, embedding_dim=dim, mlp_dim=mlp_dim, num_heads=8)
        self.num_mask_tokens = num_multimask + 1
        self.iou_token = nn.Embedding(1, dim)
        self.mask_tokens = nn.Embedding(self.num_mask_tokens, dim)
        self.output_upscaling = nn.Sequential(
            nn.ConvTranspose3d(dim, dim // 4, 2, stride=2), LayerNorm3d(dim // 4), nn.GELU(),
            nn.ConvTranspose3d(dim // 4, dim // 8, 2, stride=2), nn.GELU())
        self.output_hypernetworks_mlps = nn.ModuleList(MLP(dim, dim, dim // 8, 3) for _ in range(self.num_mask_tokens))
        self.iou_prediction_head = MLP(dim, iou_hidden, self.num_mask_tokens, 3)

    def decode(self, src: Tensor, pe: Tensor, sparse: Tensor) -> tuple[Tensor, Tensor]:
        b, c, d, h, w = src.shape
        tokens = torch.cat([self.iou_token.weight, self.mask_tokens.weight], dim=0).expand(b, -1, -1)
        tokens = torch.cat([tokens, sparse], dim=1)
        # SAM's transformer flattens dims 2: on B x C x (D H) x W the token order is that of the 3D grid
        hs, keys = self.transformer(src.reshape(b, c, d * h, w), pe.expand(b, -1, -1, -1, -1).reshape(b, c, d * h, w),
                                    tokens)
        up = self.output_upscaling(keys.transpose(1, 2).reshape(b, c, d, h, w))
        hyper = torch.stack([mlp(hs[:, 1 + i]) for i, mlp in enumerate(self.output_hypernetworks_mlps)], dim=1)
        masks = (hyper @ up.flatten(2)).view(b, -1, *up.shape[2:])
        return masks, self.iou_prediction_head(hs[:, 0])

    def forward(self, image_embeddings: Tensor, image_pe: Tensor, sparse_prompt_embeddings: Tensor,
                dense_prompt_embeddings: Tensor, multimask_output: bool) -> tuple[Tensor, Tensor]:
        masks, iou = self.decode(image_embeddings + dense_prompt_embeddings, image_pe, sparse_prompt_embeddings)
        pick = slice(1, None) if multimask_output else slice(0, 1)
        return masks[:, pick], iou[:, pick]


OFFICIAL = {"input_size": 128, "patch": 16, "width": 768, "depth": 12, "heads": 12, "out": 384, "window": 14,
            "global_blocks": (2, 5, 8, 11), "decoder_mlp": 2048, "iou_hidden": 256}
"""SAM-Med3D ``vit_b_ori`` (``build_sam3D_vit_b_ori``): the size M-SAM's release and ``sam_med3d_turbo`` use."""


@BACKBONES.register
class SamMed3D(Backbone):
    """SAM-Med3D behind the backbone interface, volumetric: ``input_size`` is the cube side, ``embed_grid`` 3-long."""

    name = "sam_med3d"
    input_size = 128
    embed_dim = 384
    embed_grid = (8, 8, 8)
    lora_targets = ("blocks.*.attn.qkv",)
    """Every ViT block's fused qkv projection (q | k | v)."""
    trained_prompts = ("points", "masks")
    """SAM-Med3D's prompt encoder takes voxel clicks and the previous mask (no boxes)."""

    def layer_modules(self) -> list[nn.Module]:
        return list(self.image_encoder.blocks)

    def _hook_output_to_nchw(self, index: int, output: Tensor) -> Tensor:
        return output.permute(0, 4, 1, 2, 3)

    def preprocess(self, images: Tensor) -> Tensor:
        """B x 1 x S^3 volumes, already clamped / z-normalised (the release's torchio pipeline): unchanged."""
        if images.dim() != 5 or images.shape[1] != 1:
            raise ConfigError(f"sam_med3d takes B x 1 x D x H x W volumes, got {tuple(images.shape)}")
        return images

    @classmethod
    def build(cls, checkpoint: str | None = None, seed: int = 0, **size) -> "SamMed3D":
        """The official size (``OFFICIAL``; ``size`` overrides any of its keys), random-init seeded, or the weights
        of ``checkpoint`` (SAM-Med3D's ``.pth``; keys and shapes checked)."""
        from ..state_dicts import load_state_checked
        from .base import file_sha256
        from .weights import read_torch_checkpoint

        unknown = sorted(set(size) - set(OFFICIAL))
        if unknown:
            raise ConfigError(f"sam_med3d: unknown size keys {unknown}; known: {sorted(OFFICIAL)}")
        s = {**OFFICIAL, **size}
        grid = s["input_size"] // s["patch"]
        if s["input_size"] % s["patch"] or s["out"] % 48:
            raise ConfigError(f"sam_med3d: input_size must be a multiple of patch and out of 48, got {s}")
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            encoder = ImageEncoderViT3D(s["input_size"], s["patch"], s["width"], s["depth"], s["heads"], s["out"],
                                        s["window"], tuple(s["global_blocks"]))
            prompt_encoder = PromptEncoder3D(s["out"], grid, s["input_size"])
            decoder = MaskDecoder3D(s["out"], s["decoder_mlp"], s["iou_hidden"])
        model = cls(encoder, prompt_encoder, decoder, weights_id=f"random-{seed}")
        model.input_size, model.embed_dim, model.embed_grid = s["input_size"], s["out"], (grid,) * 3
        if checkpoint:
            load_state_checked(model, read_torch_checkpoint(checkpoint), checkpoint)
            model.weights_id = file_sha256(checkpoint)
        return model
