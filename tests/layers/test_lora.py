"""LoRA utility: exact identity at init, SAMed q/v-only qkv, training touches LoRA only, save/load, merge."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from samadapt.backbones import build_backbone
from samadapt.errors import CheckpointError, ConfigError
from samadapt.layers import (LoRALinear, LoRAQKV, apply_lora, load_adapter, lora_parameters, lora_state_dict,
                             merge_lora, save_adapter)
from samadapt.layers.lora import lora_modules

QKV = "image_encoder.blocks.*.attn.qkv"


def _images(n: int = 2) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.rand(n, 3, 64, 64, generator=g)


def _embed(backbone) -> torch.Tensor:
    with torch.no_grad():
        return backbone.encode(backbone.preprocess(_images())).embedding


def _randomize_lora(module: nn.Module, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in lora_parameters(module):
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)


def test_identity_at_init_and_qkv_wrapping():
    backbone = build_backbone("tiny")
    before = _embed(backbone)
    base_keys = set(backbone.state_dict())
    names = apply_lora(backbone, [QKV], rank=4)
    assert names == [f"image_encoder.blocks.{i}.attn.qkv" for i in range(4)]
    assert all(isinstance(backbone.get_submodule(n), LoRAQKV) for n in names)
    assert torch.allclose(_embed(backbone), before, atol=1e-6)
    # base keys unchanged, only adapter keys added
    keys = set(backbone.state_dict())
    assert base_keys <= keys and all(".lora_" in k for k in keys - base_keys)
    # SAMed count: 4 * dim * r per block (A_q, B_q, A_v, B_v); only those train
    assert sum(p.numel() for p in lora_parameters(backbone)) == 4 * (4 * 64 * 4)
    trainable = {n for n, p in backbone.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_" in n for n in trainable)
    assert len(trainable) == 16


def test_vit_b_lora_parameter_count_matches_samed():
    with torch.device("meta"):
        backbone = build_backbone("sam_vit_b", pretrained=False)
        apply_lora(backbone.image_encoder, ["blocks.*.attn.qkv"], rank=4)
    assert sum(p.numel() for p in lora_parameters(backbone)) == 147_456  # METHODS.md: 36,864 * r


def test_qkv_variant_touches_q_and_v_only_and_scaling():
    torch.manual_seed(0)
    base = nn.Linear(8, 24)
    x = torch.randn(5, 8)
    ref = base(x).detach()
    layer = LoRAQKV(base, rank=2, alpha=4.0)
    assert layer.scaling == 2.0
    _randomize_lora(layer)
    out = layer(x).detach()
    assert torch.allclose(out[:, 8:16], ref[:, 8:16])  # k untouched
    dq = 2.0 * x @ layer.lora_A_q.T @ layer.lora_B_q.T
    dv = 2.0 * x @ layer.lora_A_v.T @ layer.lora_B_v.T
    assert torch.allclose(out[:, :8], ref[:, :8] + dq, atol=1e-6)
    assert torch.allclose(out[:, 16:], ref[:, 16:] + dv, atol=1e-6)

    plain = LoRALinear(nn.Linear(8, 3), rank=2)  # alpha defaults to rank: scaling 1 (SAMed)
    assert plain.scaling == 1.0 and torch.count_nonzero(plain.lora_B) == 0 and torch.count_nonzero(plain.lora_A) > 0


def test_generic_linear_targets_and_full_qkv_option():
    backbone = build_backbone("tiny")
    names = apply_lora(backbone, ["mask_decoder.transformer.layers.*.self_attn.q_proj", QKV], rank=2,
                       qv_only_for_qkv=False)
    assert len(names) == 2 + 4
    assert all(isinstance(backbone.get_submodule(n), LoRALinear) for n in names)


def test_optimizer_step_changes_lora_only():
    backbone = build_backbone("tiny")
    apply_lora(backbone, [QKV], rank=4)
    before = {k: v.clone() for k, v in backbone.state_dict().items()}
    params = [p for p in backbone.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1)
    for _ in range(2):
        opt.zero_grad()
        loss = backbone.encode(backbone.preprocess(_images())).embedding.pow(2).mean()
        loss.backward()
        opt.step()
    after = backbone.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == set(lora_state_dict(backbone))  # every A and B moved, nothing else did


def test_save_load_round_trip(tmp_path):
    backbone = build_backbone("tiny")
    apply_lora(backbone, [QKV], rank=3, alpha=6)
    _randomize_lora(backbone)
    want = _embed(backbone)
    path = save_adapter(backbone, tmp_path / "adapter.safetensors", {"method": "samed-test"})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter.json", "adapter.safetensors"]
    manifest = json.loads((tmp_path / "adapter.json").read_text())
    assert manifest["method"] == "samed-test" and manifest["base_weights_id"] == "random-0"
    assert manifest["base_model"] == "tiny"
    assert manifest["lora"]["rank"] == 3 and manifest["lora"]["alpha"] == 6.0
    assert manifest["lora"]["targets"] == [f"image_encoder.blocks.{i}.attn.qkv" for i in range(4)]

    fresh = build_backbone("tiny")  # no LoRA yet: created from the manifest
    assert load_adapter(fresh, path)["method"] == "samed-test"
    assert torch.allclose(_embed(fresh), want, atol=1e-6)
    assert all(not p.requires_grad for n, p in fresh.named_parameters() if ".lora_" not in n)

    prepared = build_backbone("tiny")  # LoRA applied beforehand with the same layout
    apply_lora(prepared, [QKV], rank=3, alpha=6)
    load_adapter(prepared, path)
    assert torch.allclose(_embed(prepared), want, atol=1e-6)


def test_load_adapter_fails_loudly(tmp_path):
    backbone = build_backbone("tiny")
    apply_lora(backbone, [QKV], rank=2)
    path = save_adapter(backbone, tmp_path / "a.safetensors")

    more = build_backbone("tiny")
    apply_lora(more, [QKV, "mask_decoder.transformer.layers.*.self_attn.q_proj"], rank=2)
    with pytest.raises(CheckpointError, match="missing keys: mask_decoder"):
        load_adapter(more, path)

    other_rank = build_backbone("tiny")
    apply_lora(other_rank, [QKV], rank=5)
    with pytest.raises(CheckpointError, match="shape mismatches"):
        load_adapter(other_rank, path)

    fewer = build_backbone("tiny")
    apply_lora(fewer, ["image_encoder.blocks.0.attn.qkv"], rank=2)
    with pytest.raises(CheckpointError, match="unexpected keys: image_encoder.blocks.1"):
        load_adapter(fewer, path)

    with pytest.raises(CheckpointError, match="trained on base weights random-0"):
        load_adapter(build_backbone("tiny", seed=1), path)

    (tmp_path / "a.json").unlink()
    with pytest.raises(CheckpointError, match="manifest not found"):
        load_adapter(build_backbone("tiny"), path)


def test_merge_is_equivalent():
    backbone = build_backbone("tiny")
    base_keys = set(backbone.state_dict())
    apply_lora(backbone, [QKV, "mask_decoder.transformer.layers.0.cross_attn_token_to_image.v_proj"], rank=4)
    _randomize_lora(backbone, seed=3)
    x = backbone.preprocess(_images())
    with torch.no_grad():
        before = backbone.encode(x, intermediates=True)
        assert not torch.allclose(before.embedding, _embed(build_backbone("tiny")), atol=1e-4)  # LoRA is active
    merged = merge_lora(backbone)
    assert len(merged) == 5 and not lora_modules(backbone)
    assert type(backbone.image_encoder.blocks[0].attn.qkv) is nn.Linear
    assert set(backbone.state_dict()) == base_keys
    with torch.no_grad():
        after = backbone.encode(x, intermediates=True)
    assert torch.allclose(after.embedding, before.embedding, atol=1e-5)
    for a, b in zip(after.intermediates, before.intermediates):
        assert torch.allclose(a, b, atol=1e-5)


def test_bad_targets_raise():
    backbone = build_backbone("tiny")
    with pytest.raises(ConfigError, match="matches no nn.Linear.*include: image_encoder"):
        apply_lora(backbone, ["image_encoder.blocks.*.attn.qkvv"], rank=4)
    with pytest.raises(ConfigError, match="matches no nn.Linear"):
        apply_lora(backbone, ["image_encoder.blocks.*.attn"], rank=4)  # Attention modules, not Linear
    with pytest.raises(ConfigError, match="rank"):
        apply_lora(backbone, [QKV], rank=0)
    apply_lora(backbone, [QKV], rank=4)
    with pytest.raises(ConfigError, match="already have LoRA"):
        apply_lora(backbone, [QKV], rank=4)
    with pytest.raises(ConfigError, match="no LoRA layers"):
        save_adapter(build_backbone("tiny"), "/nonexistent/never_written.safetensors")
