"""M-SAM: Mask-Enhanced Adapter, click simulator, iterative refinement, parameter ownership, evaluation helpers."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch

from samadapt.backbones import BACKBONES
from samadapt.backbones.base import Features
from samadapt.errors import ConfigError, InputError
from samadapt.layers.lora import LoRALinear, LoRAQKV, lora_modules
from samadapt.layers.mask_enhanced_adapter import MaskEnhancedAdapter, RelPosSelfAttention
from samadapt.methods import build_method
from samadapt.methods.msam import MSAM
from samadapt.evaluation.protocols.refinement import case_curves, plot_refinement_curves, pooled_dice, slice_curve
from support import discs_batch, make_method


def make(backbone, **options) -> MSAM:
    """M-SAM with the SMALL settings and 2 inference iterations."""
    return make_method("msam", backbone, **{"infer_iterations": 2, **options})


# --- Mask-Enhanced Adapter ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("tokens,grid", [("full", (16, 16)), ("pooled", (8, 8))])
def test_mea_shapes_both_token_modes(tokens, grid):
    mea = MaskEnhancedAdapter(256, (16, 16), num_heads=8, tokens=tokens, pool_size=8)
    image, mask = torch.randn(2, 256, 16, 16), torch.randn(2, 256, 16, 16)
    out = mea(image, mask)
    assert out.shape == (2, 256, 16, 16)
    assert torch.isfinite(out).all()
    assert mea.attn_f.attn_grid == grid
    assert mea.attn_f.attn.rel_pos_h.shape == (2 * grid[0] - 1, 32)
    with pytest.raises(ValueError):
        mea(image, mask[:, :, :8])


def test_mea_uses_both_inputs_and_pooling_changes_the_result():
    torch.manual_seed(0)
    full = MaskEnhancedAdapter(64, (8, 8), num_heads=4, tokens="full")
    pooled_as_full = MaskEnhancedAdapter(64, (8, 8), num_heads=4, tokens="pooled", pool_size=8)  # grid <= pool
    pooled = MaskEnhancedAdapter(64, (8, 8), num_heads=4, tokens="pooled", pool_size=4)
    with torch.no_grad():  # non-zero relative positions, so that the tables take part
        for m in full.modules():
            if isinstance(m, RelPosSelfAttention):
                m.rel_pos_h.normal_()
                m.rel_pos_w.normal_()
    pooled_as_full.load_state_dict(full.state_dict())
    state = {k: v for k, v in full.state_dict().items() if "rel_pos" not in k}
    pooled.load_state_dict(state, strict=False)
    i, p = torch.randn(1, 64, 8, 8), torch.randn(1, 64, 8, 8)
    ref = full(i, p)
    assert torch.allclose(pooled_as_full(i, p), ref, atol=1e-5)
    assert not torch.allclose(pooled(i, p), ref, atol=1e-3)
    assert not torch.allclose(full(i, torch.randn_like(p)), ref, atol=1e-3)  # the mask embedding matters
    assert not torch.allclose(full(torch.randn_like(i), p), ref, atol=1e-3)


def test_relpos_attention_matches_brute_force():
    torch.manual_seed(1)
    gh, gw, dim, heads = 3, 4, 8, 2
    attn = RelPosSelfAttention(dim, heads, (gh, gw))
    with torch.no_grad():
        attn.rel_pos_h.normal_()
        attn.rel_pos_w.normal_()
    x = torch.randn(1, gh, gw, dim)
    out = attn(x)
    hd = dim // heads
    q, k, v = attn.qkv(x).reshape(gh * gw, 3, heads, hd).unbind(1)  # N x heads x hd
    coords = [(i, j) for i in range(gh) for j in range(gw)]
    expected = torch.zeros(gh * gw, heads, hd)
    for h in range(heads):
        logits = torch.zeros(gh * gw, gh * gw)
        for a, (i, j) in enumerate(coords):
            for b, (kk, ll) in enumerate(coords):
                qa = q[a, h]
                logits[a, b] = (qa @ k[b, h]) / math.sqrt(hd) + qa @ attn.rel_pos_h[i - kk + gh - 1] \
                    + qa @ attn.rel_pos_w[j - ll + gw - 1]
        expected[:, h] = torch.softmax(logits, dim=-1) @ v[:, h]
    expected = attn.proj(expected.reshape(1, gh, gw, dim))
    assert torch.allclose(out, expected, atol=1e-5)


# --- click simulation (the policies themselves: tests/data/test_clicks.py) ---------------------------------------
def test_faithful_switch_thresholds_logits_at_half(tiny_backbone):
    prev = torch.full((1, 1, 16, 16), 0.3)  # p = sigmoid(0.3) > 0.5 everywhere, but logit < 0.5
    label = torch.ones(1, 64, 64, dtype=torch.long)
    fixed = make(tiny_backbone)
    faithful = make(tiny_backbone, faithful=True)
    assert fixed._error_clicks(prev, label, "random")[1].item() == -1  # predicted all-foreground: perfect
    assert faithful._error_clicks(prev, label, "random")[1].item() == 1  # read as empty: false negative


# --- the method -------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("tokens", ["full", "pooled"])
def test_forward_and_predict_shapes(tiny_backbone, tokens):
    method = make(tiny_backbone, mea_tokens=tokens, train_iterations=3)
    batch = discs_batch()
    method.train()
    out = method(batch)
    low = tiny_backbone.low_res_size
    assert out["iterations"].shape == (2, 3, low, low)
    assert out["logits"].shape == (2, 1, low, low)
    terms = method.loss(out, batch)
    assert set(terms) == {"loss", "loss_it1", "loss_it2", "loss_it3"}
    assert torch.isclose(terms["loss"], sum(terms[f"loss_it{t}"] for t in (1, 2, 3)))
    method.eval()
    probs = method.predict(batch)
    assert probs.shape == (2, 2, 64, 64)
    assert torch.allclose(probs.sum(dim=1), torch.ones(2, 64, 64), atol=1e-5)
    assert len(method.predict_iterations(batch)) == 2  # infer_iterations


def test_gradients_flow_through_all_iterations(tiny_backbone):
    batch = discs_batch()
    for detach in (False, True):
        method = make(tiny_backbone, train_iterations=3, detach_between_iterations=detach, click_mode="center")
        method.train()
        outs = method.refine(batch, 3, "simulate")
        for o in outs:
            o.retain_grad()
        target = batch["label"][:, None].float()
        torch.nn.functional.binary_cross_entropy_with_logits(outs[-1], target).backward()
        if detach:
            assert outs[0].grad is None and outs[1].grad is None
        else:
            assert outs[0].grad is not None and outs[0].grad.abs().sum() > 0
            assert outs[1].grad.abs().sum() > 0


def test_each_iteration_uses_the_previous_mask_and_the_clicks(tiny_backbone):
    method = make(tiny_backbone).eval()
    batch = discs_batch()
    with torch.no_grad():
        emb = method.embed(batch)
        zero = emb.new_zeros(2, 1, 64, 64)
        base = method.step(emb, zero)
        assert not torch.allclose(method.step(emb, zero + 8.0), base, atol=1e-4)
        pts = torch.tensor([[[30.0, 30.0]], [[30.0, 30.0]]])
        pos = method.step(emb, zero, (pts, torch.ones(2, 1, dtype=torch.long)))
        neg = method.step(emb, zero, (pts, torch.zeros(2, 1, dtype=torch.long)))
        assert not torch.allclose(pos, neg, atol=1e-4)
        box = method.refine(batch, 1, "auto", start="box")[0]
        empty = method.refine(batch, 1, "auto", start="empty")[0]
        assert torch.allclose(empty, base, atol=1e-5)
        assert not torch.allclose(box, empty, atol=1e-4)


def test_interactive_predict_returns_a_mask_after_each_click(tiny_backbone):
    method = make(tiny_backbone, multi_click=True).eval()
    batch = discs_batch()
    batch["points"] = torch.tensor([[[30.0, 30.0], [5.0, 5.0], [40.0, 20.0]]] * 2)
    batch["point_labels"] = torch.tensor([[1, 0, -1]] * 2)
    with torch.no_grad():
        masks = method.predict_iterations(batch)
        assert len(masks) == 3 and all(m.shape == (2, 2, 64, 64) for m in masks)
        assert torch.allclose(method.predict(batch), masks[-1])
        assert method({k: v[:, :2] if k.startswith("point") else v for k, v in batch.items()}
                      )["iterations"].shape[1] == 2  # eval forward follows the clicks too
        with pytest.raises(InputError):
            method.refine(batch, 4, "clicks")
        with pytest.raises(InputError):
            method.refine({"image": batch["image"]}, 2, "simulate")


def test_training_mixes_automatic_and_click_chains(tiny_backbone, monkeypatch):
    batch = discs_batch()
    for fraction, expected in ((0.0, "simulate"), (1.0, "auto")):
        method = make(tiny_backbone, auto_train_fraction=fraction).train()
        seen = []
        original = method.refine
        monkeypatch.setattr(method, "refine", lambda b, n, mode, **kw: seen.append((n, mode)) or original(b, n, mode))
        method(batch)
        assert seen == [(2, expected)]


def test_only_intended_parameters_train(tiny_backbone):
    method = make(tiny_backbone, auto_train_fraction=0.0)
    names = [n for n, _ in method.trainable_parameters()]
    assert names and all(n.startswith(("image_encoder.", "mea.", "prompt_encoder.", "mask_decoder.")) for n in names)
    assert all("lora_" in n for n in names if n.startswith("image_encoder."))
    assert not any(p.requires_grad for p in method.backbone.parameters())
    assert sum("lora_" in n for n in names) == 4 * len(method.lora_layers) and method.lora_layers

    groups = method.param_groups(1e-3)
    assert [g["lr"] for g in groups] == [1e-3, pytest.approx(1e-4)]
    grouped = [id(p) for g in groups for p in g["params"]]
    assert len(grouped) == len(set(grouped)) and set(grouped) == {id(p) for _, p in method.trainable_parameters()}
    sam_ids = {id(p) for p in groups[1]["params"]}
    assert sam_ids == {id(p) for m in (method.prompt_encoder, method.mask_decoder) for p in m.parameters()}

    before = {n: p.detach().clone() for n, p in method.named_parameters()}
    backbone_before = {n: p.detach().clone() for n, p in tiny_backbone.state_dict().items()}
    opt = torch.optim.AdamW(groups, weight_decay=0.1)
    method.train()
    batch = discs_batch()
    terms = method.loss(method(batch), batch)
    terms["loss"].backward()
    opt.step()
    after = dict(method.named_parameters())
    trainable = set(names)
    for n, p in after.items():
        if n not in trainable:
            assert torch.equal(p, before[n]), f"frozen parameter {n} changed"
    for n, p in tiny_backbone.state_dict().items():
        assert torch.equal(p, backbone_before[n]), f"shared backbone tensor {n} changed"
    changed = {n for n in trainable if not torch.equal(after[n], before[n])}
    for prefix in ("mea.", "mask_decoder.", "prompt_encoder.mask_downscaling."):
        assert any(n.startswith(prefix) for n in changed), prefix
    assert any("lora_B" in n for n in changed)


def test_shared_backbone_encoder_stays_without_lora(tiny_backbone):
    method = make(tiny_backbone).eval()
    assert not lora_modules(tiny_backbone)
    assert all(isinstance(m, LoRAQKV) for m in lora_modules(method.image_encoder).values())
    batch = discs_batch()
    with torch.no_grad():
        shared = tiny_backbone.image_encoder(tiny_backbone.preprocess(batch["image"]))
        assert torch.allclose(method.embed(batch), shared, atol=1e-6)  # LoRA B starts at zero
        for m in lora_modules(method.image_encoder).values():
            m.lora_B_q.add_(0.1)
        assert not torch.allclose(method.embed(batch), shared, atol=1e-4)
        again = tiny_backbone.image_encoder(tiny_backbone.preprocess(batch["image"]))
    assert torch.equal(again, shared)


def test_train_mode_keeps_frozen_encoders_in_eval(tiny_backbone):
    method = make(tiny_backbone)
    method.train()
    assert method.mea.training and method.mask_decoder.training and not method.backbone.training
    lora = [m for m in method.image_encoder.modules() if any("lora_" in n for n, _ in m.named_parameters(recurse=False))]
    assert lora and all(m.training for m in lora)  # as in H-SAM and SAMed; frozen BatchNorm: test_lora_encoder


def test_lora_table_matches_tinyvit_attention_layers():
    from samadapt.backbones import build_backbone
    from samadapt.layers.lora_heads import LoRAHeadQKV

    lite = build_backbone("litemedsam", pretrained=False)
    qkv = [n for n, m in lite.image_encoder.named_modules() if n.endswith("attn.qkv")]
    method = build_method("msam", lite, {"mea_mlp_ratio": 0.5})
    assert len(qkv) == 10 and sorted(method.lora_layers) == sorted(qkv)
    wrappers = lora_modules(method.image_encoder)
    assert all(isinstance(w, LoRAHeadQKV) for w in wrappers.values())  # q/v placed per head, not q|k|v thirds
    full = build_method("msam", lite, {"mea_mlp_ratio": 0.5, "lora_layout": "full"})
    assert all(isinstance(w, LoRALinear) for w in lora_modules(full.image_encoder).values())
    assert not lora_modules(lite.image_encoder)
    assert all(BACKBONES.get(n).lora_targets for n in ("litemedsam", "sam_vit_b", "sam_vit_l", "sam_vit_h", "tiny"))


def test_lora_rank_zero_uses_the_frozen_encoder_and_cache(tiny_backbone):
    method = make(tiny_backbone, lora_rank=0)
    assert method.image_encoder is None and method.needs_encoder_grad is False
    assert MSAM.needs_encoder_grad is True
    batch = discs_batch()
    fake = Features(torch.randn(2, 256, 16, 16))
    assert torch.equal(method.embed(dict(batch, features=fake)), fake.embedding)
    lora = make(tiny_backbone)
    assert not torch.equal(lora.embed(dict(batch, features=fake)), fake.embedding)  # recomputed with LoRA


@pytest.mark.parametrize("bad", [{"mea_tokens": "window"}, {"auto_start": "points"}, {"click_mode": "edge"},
                                 {"train_iterations": 0}, {"auto_train_fraction": 1.5}, {"lora_rank": -1},
                                 {"lora_layout": "qkv"},
                                 {"no_such_option": 1}])
def test_bad_options_are_refused(tiny_backbone, bad):
    with pytest.raises(ConfigError):
        build_method("msam", tiny_backbone, bad)


def test_unknown_backbone_needs_explicit_lora_targets(tiny_backbone):
    other = copy.copy(tiny_backbone)
    other.name, other.lora_targets = "unknown-backbone", ()  # a backbone that declares no LoRA targets
    with pytest.raises(ConfigError, match="lora_targets"):
        build_method("msam", other, {})
    method = build_method("msam", other, {"lora_targets": ["blocks.0.attn.qkv"], "mea_pool_size": 8})
    assert method.lora_layers == ["blocks.0.attn.qkv"]


# --- evaluation helpers -----------------------------------------------------------------------------------------------
def test_pooled_dice_counts():
    p = [torch.tensor([[0.9, 0.9], [0.1, 0.1]]), torch.zeros(2, 2)]
    g = [torch.tensor([[1, 0], [0, 0]]), torch.tensor([[1, 1], [0, 0]])]
    assert pooled_dice(p, g) == pytest.approx(2 * 1 / (2 + 3))
    assert pooled_dice([torch.zeros(2, 2)], [torch.zeros(2, 2)]) == 1.0


def test_slice_and_case_curves_and_plot(tiny_backbone, tmp_path):
    from samadapt.data.cases import Case

    method = make(tiny_backbone).eval()
    batch = discs_batch(3)
    items = [{"image": batch["image"][i], "label": batch["label"][i]} for i in range(3)]
    for mode in ("auto", "simulate"):
        curve = slice_curve(method, items, 3, mode, batch_size=2)
        assert len(curve) == 3 and all(0.0 <= d <= 1.0 for d in curve)
    label = np.zeros((3, 40, 50), dtype=np.int64)
    label[:, 10:30, 15:35] = 1
    image = (label * 0.8 + 0.1).astype(np.float32)[None]
    curves = case_curves(method, Case("c0", image, label), 2, batch_size=2)
    assert set(curves) == {"auto", "simulate"} and all(len(v) == 2 for v in curves.values())
    png = plot_refinement_curves({"auto": [0.5, 0.6], "simulate": [0.7, 0.8, 0.9]}, tmp_path / "c.png",
                                 {"decoder": 0.55})
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# --- integration: real LiteMedSAM weights, real MNI152 slices ------------------------------------------------------
@pytest.mark.integration
def test_msam_litemedsam_loss_falls_on_real_data(litemedsam_backbone, real_brain_batch):
    torch.manual_seed(0)
    method = build_method("msam", litemedsam_backbone, {"train_iterations": 2, "mea_mlp_ratio": 1.0,
                                                        "auto_train_fraction": 0.0, "click_mode": "center"})
    batch = {"image": real_brain_batch["image"][:2], "label": real_brain_batch["label"][:2]}
    assert batch["label"].sum() > 0
    opt = torch.optim.AdamW(method.param_groups(8e-4), weight_decay=0.1)
    method.train()
    losses = []
    for _ in range(4):
        terms = method.loss(method(batch), batch)
        opt.zero_grad()
        terms["loss"].backward()
        opt.step()
        losses.append(float(terms["loss"]))
    assert all(math.isfinite(v) for v in losses)
    assert losses[-1] < losses[0], losses
    assert not lora_modules(litemedsam_backbone.image_encoder)
