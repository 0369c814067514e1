"""SAM-Med3D backbone: the official checkpoint's key names and shapes, loading a saved state dict and the loud
failure on wrong keys, and 3D shapes end to end (encoder, prompts, 3D MEA, decoder) on a tiny 3D config."""

from __future__ import annotations

import pytest
import torch

from samadapt.backbones import BACKBONES
from samadapt.backbones.sam_med3d import SamMed3D
from samadapt.errors import CheckpointError, ConfigError
from samadapt.layers.mask_enhanced_adapter import MaskEnhancedAdapter

TINY = {"input_size": 32, "patch": 8, "width": 24, "depth": 2, "heads": 2, "out": 48, "window": 3,
        "global_blocks": (1,), "decoder_mlp": 32, "iou_hidden": 16}

# Read from SAM-Med3D's public code (build_sam3D_vit_b_ori: image 128, patch 16, width 768, window 14, out 384;
# image_encoder3D.py, prompt_encoder3D.py, mask_decoder3D.py), the names and shapes sam_med3d_turbo.pth holds.
OFFICIAL_KEYS = {
    "image_encoder.patch_embed.proj.weight": (768, 1, 16, 16, 16),
    "image_encoder.pos_embed": (1, 8, 8, 8, 768),
    "image_encoder.blocks.0.attn.rel_pos_d": (27, 64),  # windowed block: window 14
    "image_encoder.blocks.2.attn.rel_pos_w": (15, 64),  # global block: 8^3 grid
    "image_encoder.blocks.11.attn.qkv.weight": (2304, 768),
    "image_encoder.blocks.11.mlp.lin2.weight": (768, 3072),
    "image_encoder.neck.0.weight": (384, 768, 1, 1, 1),
    "image_encoder.neck.2.weight": (384, 384, 3, 3, 3),
    "image_encoder.neck.3.bias": (384,),
    "prompt_encoder.pe_layer.positional_encoding_gaussian_matrix": (3, 128),
    "prompt_encoder.point_embeddings.1.weight": (1, 384),
    "prompt_encoder.not_a_point_embed.weight": (1, 384),
    "prompt_encoder.mask_downscaling.0.weight": (4, 1, 2, 2, 2),
    "prompt_encoder.mask_downscaling.6.weight": (384, 16, 1, 1, 1),
    "prompt_encoder.no_mask_embed.weight": (1, 384),
    "mask_decoder.transformer.layers.0.cross_attn_token_to_image.q_proj.weight": (192, 384),
    "mask_decoder.transformer.layers.1.mlp.lin1.weight": (2048, 384),
    "mask_decoder.transformer.final_attn_token_to_image.out_proj.weight": (384, 192),
    "mask_decoder.mask_tokens.weight": (4, 384),
    "mask_decoder.output_upscaling.0.weight": (384, 96, 2, 2, 2),
    "mask_decoder.output_upscaling.1.weight": (96,),
    "mask_decoder.output_upscaling.3.weight": (96, 48, 2, 2, 2),
    "mask_decoder.output_hypernetworks_mlps.3.layers.2.weight": (48, 384),
    "mask_decoder.iou_prediction_head.layers.2.weight": (4, 256),
}


def test_official_size_has_the_release_keys_and_shapes():
    with torch.device("meta"):
        model = SamMed3D.build()
    state = model.state_dict()
    for key, shape in OFFICIAL_KEYS.items():
        assert tuple(state[key].shape) == shape, key
    assert not any(k.startswith(("pixel_mean", "pixel_std")) for k in state)  # SAM's buffers are not saved
    assert sum(1 for k in state if k.endswith(".attn.qkv.weight")) == 12
    assert model.embed_grid == (8, 8, 8) and model.low_res_size == 32 and model.embed_dim == 384
    assert "sam_med3d" in BACKBONES.names()


def test_checkpoint_loads_from_a_path_and_wrong_keys_fail_loudly(tmp_path):
    source = SamMed3D.build(seed=1, **TINY)
    path = tmp_path / "sam_med3d_turbo.pth"
    torch.save({"model_state_dict": source.state_dict(), "epoch": 3}, path)  # the release's wrapper
    loaded = SamMed3D.build(checkpoint=str(path), seed=2, **TINY)
    for key, value in source.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    assert loaded.weights_id != "random-2"

    renamed = dict(source.state_dict())
    renamed["image_encoder.blocks.0.attn.rel_pos_z"] = renamed.pop("image_encoder.blocks.0.attn.rel_pos_d")
    torch.save(renamed, path)
    with pytest.raises(CheckpointError, match=r"missing keys: image_encoder\.blocks\.0\.attn\.rel_pos_d.*"
                                              r"unexpected keys: image_encoder\.blocks\.0\.attn\.rel_pos_z"):
        SamMed3D.build(checkpoint=str(path), **TINY)
    torch.save(SamMed3D.build(**{**TINY, "width": 48}).state_dict(), path)  # another size
    with pytest.raises(CheckpointError, match="shape mismatches"):
        SamMed3D.build(checkpoint=str(path), **TINY)
    with pytest.raises(ConfigError, match="unknown size keys"):
        SamMed3D.build(depths=3)


def test_3d_shapes_end_to_end_with_the_3d_mea():
    torch.manual_seed(0)
    model = SamMed3D.build(**TINY).eval()
    volume = torch.randn(2, 1, 32, 32, 32)
    embedding = model.image_encoder(model.preprocess(volume))
    assert embedding.shape == (2, 48, 4, 4, 4)
    pe = model.prompt_encoder
    points = torch.tensor([[[10.0, 5.0, 20.0]], [[3.0, 30.0, 8.0]]])
    labels = torch.tensor([[1], [0]])
    prev = torch.zeros(2, 1, 16, 16, 16)
    sparse, dense = pe(points=(points, labels), masks=prev)
    assert sparse.shape == (2, 2, 48) and dense.shape == (2, 48, 4, 4, 4)
    assert pe.get_dense_pe().shape == (1, 48, 4, 4, 4)
    logits, iou = model.mask_decoder(embedding, pe.get_dense_pe(), sparse, dense, multimask_output=False)
    assert logits.shape == (2, 1, 16, 16, 16) and iou.shape == (2, 1)
    mea = MaskEnhancedAdapter(48, (4, 4, 4), num_heads=6, tokens="full")
    masks, _ = model.mask_decoder.decode(mea(embedding, dense), pe.get_dense_pe(), sparse)
    assert masks.shape == (2, 4, 16, 16, 16) and torch.isfinite(masks).all()
    other, _ = pe(points=(points, 1 - labels), masks=prev)
    assert not torch.allclose(model.mask_decoder.decode(embedding + dense, pe.get_dense_pe(), other)[0],
                              model.mask_decoder.decode(embedding + dense, pe.get_dense_pe(), sparse)[0])
    with pytest.raises(ConfigError, match="not boxes"):
        pe(boxes=torch.zeros(2, 6))
    with pytest.raises(ConfigError, match="B x 1 x D x H x W"):
        model.preprocess(torch.zeros(2, 3, 32, 32))


def test_windowed_attention_pads_the_grid_like_the_release():
    model = SamMed3D.build(**TINY)
    block = model.image_encoder.blocks[0]
    assert block.window == 3 and block.attn.rel_pos_d.shape == (5, 12)  # 4^3 grid padded to 6^3: 8 windows of 3^3
    x = torch.randn(1, 4, 4, 4, 24)
    assert block(x).shape == x.shape
