"""backbone.input_size and backbone.normalization in the run config: SAM ViT-B at 512 px (position embeddings
resampled, shapes), fixed-size backbones refuse another size, unit normalisation, the H-SAM/SAMed paper presets."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from samadapt.backbones import build_backbone
from samadapt.config.run_config import RunConfig, load_config
from samadapt.engine.run import build_model
from samadapt.errors import ConfigError

pytestmark = pytest.mark.usefixtures("one_torch_thread")

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def ramp_vit_b_file(tmp_path_factory):
    """A random ViT-B checkpoint whose position tables are linear ramps, so that resampled values are known:
    ``pos_embed[0, y, x, c] = (x + 0.5) / 64`` (1024 px: 64 x 64 tokens) and, in every global block,
    ``rel_pos_h[i, c] = rel_pos_w[i, c] = i`` for the 127 relative offsets."""
    backbone = build_backbone("sam_vit_b", pretrained=False, seed=2)
    state = backbone.state_dict()
    x = (torch.arange(64, dtype=torch.float32) + 0.5) / 64
    state["image_encoder.pos_embed"] = x.view(1, 1, 64, 1).expand(1, 64, 64, 768).clone()
    for i in (2, 5, 8, 11):
        for axis in ("h", "w"):
            state[f"image_encoder.blocks.{i}.attn.rel_pos_{axis}"] = (
                torch.arange(127, dtype=torch.float32)[:, None].expand(127, 64).clone())
    path = tmp_path_factory.mktemp("ckpt") / "ramp_vit_b.pth"
    torch.save(state, path)
    return path


def test_input_size_reaches_the_encoder_with_resampled_position_tables(ramp_vit_b_file):
    cfg = RunConfig()
    cfg.backbone.name, cfg.backbone.checkpoint, cfg.backbone.input_size = "sam_vit_b", str(ramp_vit_b_file), 512
    cfg.method.name = "decoder"
    backbone, _ = build_model(cfg, 1, CPU)
    assert backbone.input_size == 512 and backbone.embed_grid == (32, 32) and backbone.low_res_size == 128
    assert backbone.describe()["input_size"] == 512
    enc = backbone.image_encoder
    assert enc.pos_embed.shape == (1, 32, 32, 768)
    # the x ramp survives the (bicubic, antialiased) 64 -> 32 resampling away from the borders: (j + 0.5) / 32
    want = (np.arange(32) + 0.5) / 32
    got = enc.pos_embed[0, 16, :, 0].detach().numpy()
    np.testing.assert_allclose(got[3:-3], want[3:-3], atol=2e-3)
    assert float(enc.pos_embed[0, :, 10, 5].std()) < 1e-6  # constant along y, as the ramp
    for i, blk in enumerate(enc.blocks):
        if blk.window_size == 0:  # global block: 2 * 32 - 1 offsets, linearly resampled from 127
            assert blk.attn.rel_pos_h.shape == blk.attn.rel_pos_w.shape == (63, 64)
            coords = (np.arange(63) + 0.5) * 127 / 63 - 0.5  # align_corners=False source coordinates
            np.testing.assert_allclose(blk.attn.rel_pos_h[1:-1, 7].detach().numpy(), coords[1:-1], atol=1e-4)
        else:  # windowed block: window 14 keeps its 27 offsets
            assert blk.attn.rel_pos_h.shape == (27, 64)
    pe = backbone.prompt_encoder
    assert pe.image_embedding_size == (32, 32) and pe.get_dense_pe().shape == (1, 256, 32, 32)
    with torch.no_grad():
        feats = backbone.encode(backbone.preprocess(torch.rand(1, 3, 512, 512)))
    assert feats.embedding.shape == (1, 256, 32, 32)


def test_fixed_size_backbones_refuse_another_input_size():
    assert build_backbone("tiny", input_size=64).input_size == 64  # its own size is fine
    with pytest.raises(ConfigError, match=r"tiny runs at 64 px only; backbone.input_size=128"):
        build_backbone("tiny", input_size=128)
    with pytest.raises(ConfigError, match=r"litemedsam runs at 256 px only; backbone.input_size=512"):
        build_backbone("litemedsam", pretrained=False, input_size=512)
    with pytest.raises(ConfigError, match="multiple of 16"):
        build_backbone("sam_vit_b", pretrained=False, input_size=500)


def test_unit_normalization_feeds_the_unit_images_and_names_itself():
    native = build_backbone("sam_vit_b", pretrained=False, seed=3, input_size=64)
    unit = build_backbone("sam_vit_b", pretrained=False, seed=3, input_size=64, normalization="unit")
    images = torch.rand(2, 3, 64, 64)
    torch.testing.assert_close(unit.preprocess(images), images)
    torch.testing.assert_close(native.preprocess(images)[:, 0], (images[:, 0] * 255 - 123.675) / 58.395)
    assert unit.weights_id == native.weights_id + "+unit-norm"  # caches and checkpoints never mix the two
    tiny, tiny_unit = build_backbone("tiny"), build_backbone("tiny", normalization="unit")
    assert tiny_unit.weights_id == tiny.weights_id  # already fed [0, 1] images: nothing changes
    torch.testing.assert_close(tiny_unit.preprocess(images), tiny.preprocess(images))
    with pytest.raises(ConfigError, match="normalization"):
        build_backbone("tiny", normalization="imagenet")
    cfg = load_config(None, ["backbone.name=tiny", "backbone.normalization=unit", "backbone.input_size=64"])
    assert (cfg.backbone.normalization, cfg.backbone.input_size) == ("unit", 64)


@pytest.mark.parametrize("preset,method", [("hsam_paper", "hsam"), ("samed_paper", "samed")])
def test_paper_presets_build_at_512_with_unit_normalization(preset, method, ramp_vit_b_file):
    cfg = load_config(preset, [f"backbone.checkpoint={ramp_vit_b_file}"])
    assert cfg.backbone.input_size == 512 and cfg.backbone.normalization == "unit"
    backbone, model = build_model(cfg, 8, CPU)
    assert model.name == method and model.input_size == 512 and backbone.embed_grid == (32, 32)
    assert backbone.weights_id.endswith("+unit-norm")
    if method == "hsam":
        assert model.config.class_noise is False and model.config.feature_noise_range == "batch"
        assert model.stage2.pool == (32, 32)  # CMAttn on the full 32 x 32 map, no pooling
    else:
        assert model.decoder.mask_tokens.num_embeddings == 9 and model.decoder.order == "sam"
