"""SAM ViT-B/L/H backbones: architecture, checkpoint loading (and its loud failures), intermediates, download."""

from __future__ import annotations

import dataclasses
import hashlib
import logging

import pytest
import torch

from samadapt.backbones import build_backbone
from samadapt.backbones import sam as sam_mod
from samadapt.errors import CheckpointError, ConfigError
from samadapt.backbones.weights import cache_dir, download_file


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture(scope="module")
def vit_b():
    """One random-init ViT-B (seed 1) and its state dict saved as a Meta-style .pth (built once: ~1 s)."""
    return build_backbone("sam_vit_b", pretrained=False, seed=1)


@pytest.fixture(scope="module")
def vit_b_file(vit_b, tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "random_vit_b.pth"
    torch.save(vit_b.state_dict(), path)
    return path


@pytest.fixture
def home(tmp_path, monkeypatch):
    path = tmp_path / "home"
    monkeypatch.setenv("SAMADAPT_HOME", str(path))
    monkeypatch.delenv(sam_mod.BASE_URL_ENV, raising=False)
    return path


# --- architecture ------------------------------------------------------------------------------------------------

def test_vit_b_architecture(vit_b):
    info = vit_b.describe()
    assert info["name"] == "sam_vit_b" and info["weights_id"] == "random-1"
    assert vit_b.input_size == 1024 and vit_b.embed_grid == (64, 64) and vit_b.low_res_size == 256
    assert vit_b.intermediate_blocks == (2, 5, 8)
    assert vit_b.intermediate_widths == (768, 768, 768)
    # METHODS.md section 0: encoder ~89.67M, prompt encoder ~6.2K, mask decoder ~4.06M parameters
    assert info["parameters"]["image_encoder"] == pytest.approx(89.67e6, abs=0.01e6)
    assert info["parameters"]["prompt_encoder"] == pytest.approx(6.2e3, abs=0.1e3)
    assert info["parameters"]["mask_decoder"] == pytest.approx(4.06e6, abs=0.01e6)
    # SAM's normalisation on the 0-255 scale, for images that arrive in [0, 1]
    x = torch.zeros(1, 3, 2, 2)
    x[:, 0] = 1.0
    y = vit_b.preprocess(x)
    assert y[0, 0, 0, 0].item() == pytest.approx((255 - 123.675) / 58.395)
    assert y[0, 1, 0, 0].item() == pytest.approx(-116.28 / 57.12)


@pytest.mark.parametrize("name, width, blocks, depth, params", [
    ("sam_vit_l", 1024, (5, 11, 17), 24, 308.3e6),
    ("sam_vit_h", 1280, (7, 15, 23), 32, 637.0e6),
])
def test_vit_l_h_architecture_on_meta_device(name, width, blocks, depth, params):
    with torch.device("meta"):
        backbone = build_backbone(name, pretrained=False)
    assert backbone.intermediate_blocks == blocks
    assert backbone.intermediate_widths == (width,) * 3
    assert len(backbone.image_encoder.blocks) == depth
    assert backbone.embed_grid == (64, 64) and backbone.input_size == 1024
    assert backbone.describe()["parameters"]["image_encoder"] == pytest.approx(params, abs=0.1e6)


def test_unknown_and_bad_size():
    with pytest.raises(ConfigError, match="vit_x"):
        sam_mod.build_sam_backbone("sam_vit_x", pretrained=False)
    with pytest.raises(ConfigError, match="multiple of 16"):
        with torch.device("meta"):
            build_backbone("sam_vit_b", pretrained=False, input_size=1000)


# --- checkpoint loading ---------------------------------------------------------------------------------------------

def test_checkpoint_round_trip(vit_b, vit_b_file):
    loaded = build_backbone("sam_vit_b", checkpoint=str(vit_b_file))
    assert loaded.weights_id == sha256_bytes(vit_b_file.read_bytes())
    ref, got = vit_b.state_dict(), loaded.state_dict()
    assert set(ref) == set(got)
    assert all(torch.equal(ref[k], got[k]) for k in ref)


def test_checkpoint_with_missing_keys_fails(vit_b, tmp_path):
    state = {k: v for k, v in vit_b.state_dict().items() if not k.startswith("image_encoder.")}
    path = tmp_path / "no_encoder.pth"
    torch.save(state, path)
    with pytest.raises(CheckpointError, match="missing keys: image_encoder") as err:
        build_backbone("sam_vit_b", checkpoint=str(path))
    assert str(path) in str(err.value)


def test_checkpoint_matching_no_key_fails(tmp_path):
    path = tmp_path / "other.pth"
    torch.save({"encoder.weight": torch.zeros(2, 2)}, path)
    with pytest.raises(CheckpointError, match="no key matches"):
        build_backbone("sam_vit_b", checkpoint=str(path))


def test_checkpoint_for_another_architecture_fails(tmp_path):
    tiny = tmp_path / "tiny.pth"
    torch.save(build_backbone("tiny").state_dict(), tiny)  # same SAM key layout, width 64, 4 blocks
    with pytest.raises(CheckpointError, match="width 64, 4 blocks.*needs width 768"):
        build_backbone("sam_vit_b", checkpoint=str(tiny))
    vit_l_like = tmp_path / "vit_l_like.pth"
    torch.save({"image_encoder.pos_embed": torch.zeros(1, 2, 2, 1024),
                **{f"image_encoder.blocks.{i}.norm1.weight": torch.zeros(1024) for i in range(24)}}, vit_l_like)
    with pytest.raises(CheckpointError, match="sam_vit_l checkpoint"):
        build_backbone("sam_vit_b", checkpoint=str(vit_l_like))


def test_missing_checkpoint_path_fails(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        build_backbone("sam_vit_b", checkpoint=str(tmp_path / "nope.pth"))


# --- intermediates, on a reduced input size (a 1024 px ViT-B forward takes ~30 s on 2 CPU cores) -------------------

def test_intermediates_and_reduced_input_from_checkpoint(vit_b, vit_b_file):
    backbone = build_backbone("sam_vit_b", checkpoint=str(vit_b_file), input_size=224)
    assert backbone.input_size == 224 and backbone.embed_grid == (14, 14) and backbone.low_res_size == 56
    enc = backbone.image_encoder
    assert enc.pos_embed.shape == (1, 14, 14, 768)
    assert enc.blocks[2].attn.rel_pos_h.shape == (27, 64)  # global block: 2 * 14 - 1
    assert enc.blocks[0].attn.rel_pos_h.shape == (27, 64)  # windowed block (window 14) unchanged
    ref = vit_b.state_dict()
    assert torch.equal(enc.blocks[0].attn.rel_pos_h, ref["image_encoder.blocks.0.attn.rel_pos_h"])
    assert torch.equal(enc.blocks[3].mlp.lin1.weight, ref["image_encoder.blocks.3.mlp.lin1.weight"])

    torch.manual_seed(0)
    x = backbone.preprocess(torch.rand(2, 3, 224, 224))
    with torch.no_grad():
        feats = backbone.encode(x, intermediates=True)
        # the same maps computed by hand from the encoder's own modules
        h = enc.patch_embed(x) + enc.pos_embed
        manual = []
        for i, blk in enumerate(enc.blocks):
            h = blk(h)
            if i in (2, 5, 8):
                manual.append(h.permute(0, 3, 1, 2))
        embedding = enc.neck(h.permute(0, 3, 1, 2))
        sparse, dense = backbone.prompt_encoder(points=None, boxes=None, masks=None)
        masks, iou = backbone.mask_decoder(feats.embedding[:1], backbone.prompt_encoder.get_dense_pe(), sparse,
                                           dense, multimask_output=False)
    assert feats.embedding.shape == (2, 256, 14, 14)
    assert [tuple(t.shape) for t in feats.intermediates] == [(2, 768, 14, 14)] * 3
    for got, want in zip(feats.intermediates, manual):
        assert torch.allclose(got, want, atol=1e-5)
    assert torch.allclose(feats.embedding, embedding, atol=1e-5)
    assert masks.shape == (1, 1, 56, 56) and iou.shape == (1, 1)
    with pytest.raises(ValueError, match="224x224"):
        backbone.encode(torch.zeros(1, 3, 256, 256))


# --- weights location and download ---------------------------------------------------------------------------------

def test_samadapt_home_is_the_cache(home):
    assert cache_dir() == home


def _serve(tmp_path, data: bytes, name: str = "served.pth"):
    src = tmp_path / "server"
    src.mkdir(exist_ok=True)
    (src / name).write_bytes(data)
    return src, (src / name).as_uri()


def test_download_good_hash_caches(home, tmp_path, monkeypatch):
    data = b"pretend checkpoint " * 1000
    src, url = _serve(tmp_path, data)
    info = sam_mod.SamCheckpointInfo("sam_vit_b_01ec64.pth", sha256_bytes(data), len(data), url=url)
    monkeypatch.setitem(sam_mod.SAM_CHECKPOINTS, "sam_vit_b", info)
    path = sam_mod.resolve_sam_checkpoint("sam_vit_b", progress=False)
    assert path == home / "sam_vit_b_01ec64.pth" and path.read_bytes() == data
    assert sorted(p.name for p in home.iterdir()) == ["sam_vit_b_01ec64.pth"]  # no temp file left
    (src / "served.pth").unlink()  # second call uses the cache, no download
    assert sam_mod.resolve_sam_checkpoint("sam_vit_b", progress=False) == path


@pytest.mark.parametrize("field, value, message", [
    ("sha256", "0" * 64, "SHA-256 mismatch"),
    ("size", 5, "expected 5"),
])
def test_download_mismatch_raises_and_leaves_nothing(home, tmp_path, monkeypatch, field, value, message):
    data = b"x" * 4096
    _src, url = _serve(tmp_path, data)
    info = sam_mod.SamCheckpointInfo("sam_vit_b_01ec64.pth", sha256_bytes(data), len(data), url=url)
    monkeypatch.setitem(sam_mod.SAM_CHECKPOINTS, "sam_vit_b", dataclasses.replace(info, **{field: value}))
    with pytest.raises(CheckpointError, match=message) as err:
        sam_mod.resolve_sam_checkpoint("sam_vit_b", progress=False)
    assert url in str(err.value)
    assert not home.exists() or list(home.iterdir()) == []


def test_download_unreachable_url_names_it(home, tmp_path):
    url = (tmp_path / "missing.pth").as_uri()
    with pytest.raises(CheckpointError, match="download failed") as err:
        download_file(url, home / "x.pth", progress=False)
    assert url in str(err.value)
    assert list(home.iterdir()) == []


def test_download_unknown_hash_warns(home, tmp_path, caplog):
    data = b"abc" * 100
    _src, url = _serve(tmp_path, data)
    with caplog.at_level(logging.WARNING, logger="samadapt.backbones.weights"):
        path = download_file(url, home / "y.pth", sha256=None, progress=False)
    assert path.read_bytes() == data
    assert "no known SHA-256" in caplog.text and sha256_bytes(data) in caplog.text


def test_no_weights_and_no_download_explains(home):
    with pytest.raises(CheckpointError, match="sam_vit_h_4b8939.pth") as err:
        build_backbone("sam_vit_h", download=False)
    assert str(home) in str(err.value)


def test_corrupt_cached_file_is_refused(home):
    home.mkdir()
    (home / "sam_vit_b_01ec64.pth").write_bytes(b"truncated")
    with pytest.raises(CheckpointError, match="differs from Meta's sam_vit_b"):
        build_backbone("sam_vit_b")


def test_factory_downloads_from_base_url_and_loads(vit_b, vit_b_file, home, monkeypatch):
    """End to end with no --checkpoint: empty cache -> download (file:// mirror) -> verify -> load."""
    digest = sha256_bytes(vit_b_file.read_bytes())
    monkeypatch.setenv(sam_mod.BASE_URL_ENV, vit_b_file.parent.as_uri())
    monkeypatch.setitem(sam_mod.SAM_CHECKPOINTS, "sam_vit_b",
                        sam_mod.SamCheckpointInfo(vit_b_file.name, digest, vit_b_file.stat().st_size))
    backbone = build_backbone("sam_vit_b", progress=False)
    assert (home / vit_b_file.name).is_file()
    assert backbone.weights_id == digest
    assert torch.equal(backbone.image_encoder.pos_embed, vit_b.image_encoder.pos_embed)
