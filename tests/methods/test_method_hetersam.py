"""HeterSAM: deformable SE attention (ring init, sampling points that learn apart, known-offset sampling), Swin-U
prompt encoder, fusion switches, frozen SAM parts, light decoder and its distillation path, loss variants;
integration on LiteMedSAM + real MNI152 slices."""

from __future__ import annotations

import pytest
import torch

from samadapt.errors import ConfigError
from samadapt.layers.deformable_attention import (DeformableAttention, DeformableSEFusion, DeformableTwoWayBlock,
                                                  ValueSEGate, deformable_sample, grid_reference)
from samadapt.methods import build_method
from samadapt.methods.hetersam import HeterSAM, SwinUPromptEncoder, minmax_normalise, soft_dice_loss
from support import make_method, square_batch, train_steps


def make(backbone, **options) -> HeterSAM:
    return make_method("hetersam", backbone, **options)


def tiny_batch(n=2, seed=0):
    """A box, brighter in the image so that it is learnable."""
    return square_batch([(1, 16, 44, 20, 52)], n, 64, seed, brighten=0.5)


# --- the sampling core and the deformable attention ----------------------------------------------------------------
def ramp(h, w, heads=2, ch=3):
    """value[b, head, c, y, x] = 100 y + x + 1000 c + 10000 head: bilinear sampling of it is exact inside the map."""
    y = torch.arange(h, dtype=torch.float64).view(h, 1)
    x = torch.arange(w, dtype=torch.float64).view(1, w)
    base = 100 * y + x
    v = torch.stack([torch.stack([base + 1000 * c + 10000 * hd for c in range(ch)]) for hd in range(heads)])
    return v.unsqueeze(0)  # 1 x heads x ch x h x w


def test_deformable_sample_reads_bilinear_locations():
    h, w = 8, 10
    value = ramp(h, w)
    # pixel coordinates (x, y) -> fractions: pixel centre j is at (j + 0.5) / w
    px = torch.tensor([[2.0, 3.0], [4.25, 1.5], [7.0, 6.75]], dtype=torch.float64)  # Nq x 2
    loc = (px + 0.5) / torch.tensor([w, h], dtype=torch.float64)
    locations = loc[None, :, None, None, :].expand(1, 3, 2, 1, 2)  # B x Nq x H x K=1 x 2
    weights = torch.ones(1, 3, 2, 1, dtype=torch.float64)
    out = deformable_sample(value, locations, weights).reshape(1, 3, 2, 3)  # B x Nq x H x Ch
    expected = 100 * px[:, 1] + px[:, 0]
    for hd in range(2):
        for c in range(3):
            assert torch.allclose(out[0, :, hd, c], expected + 1000 * c + 10000 * hd)
    # weights combine the K points: 0.25 * a + 0.75 * b
    two = torch.stack([loc[0], loc[1]])[None, None, None].expand(1, 1, 2, 2, 2)
    out = deformable_sample(value, two, torch.tensor([0.25, 0.75], dtype=torch.float64).expand(1, 1, 2, 2))
    assert torch.allclose(out[0, 0, 0], 0.25 * expected[0] + 0.75 * expected[1])
    # outside the map reads zeros
    far = torch.full((1, 1, 2, 1, 2), 5.0, dtype=torch.float64)
    assert deformable_sample(value, far, torch.ones(1, 1, 2, 1, dtype=torch.float64)).abs().max() == 0


def _projected(attn: DeformableAttention, value: torch.Tensor) -> torch.Tensor:
    """The SE-gated per-pixel value projection as B x h x w x C_internal."""
    b, _, h, w = value.shape
    v = attn.project_value(value)  # B x H x Ch x h x w
    return v.reshape(b, -1, h, w).permute(0, 2, 3, 1)


def test_deformable_attention_zero_init_is_average_of_points_at_reference():
    torch.manual_seed(0)
    attn = DeformableAttention(32, num_heads=4, num_points=3, downsample_rate=2, offset_init="zero")
    h, w = 6, 7
    value = torch.randn(2, 32, h, w)
    query = torch.randn(2, h * w, 32)
    ref = grid_reference(h, w, 2, query)
    locations, weights = attn.sampling_locations(query, ref, (h, w))
    assert torch.allclose(locations, ref[:, :, None, None, :].expand_as(locations))  # zero offsets
    assert torch.allclose(weights, torch.full_like(weights, 1 / 3))  # uniform weights
    out = attn(query, ref, value)
    expected = attn.out_proj(_projected(attn, value).reshape(2, h * w, -1))  # each pixel reads itself
    assert torch.allclose(out, expected, atol=1e-5)
    # the output no longer depends on the query (offsets and weights are zero-initialised linear maps)
    assert torch.allclose(attn(torch.randn_like(query), ref, value), out, atol=1e-5)


def test_deformable_attention_ring_init_is_local_average():
    torch.manual_seed(0)
    attn = DeformableAttention(16, num_heads=4, num_points=1)  # the default init: ring
    with torch.no_grad():  # identity output projection: read the per-head samples directly
        attn.out_proj.weight.copy_(torch.eye(16))
        attn.out_proj.bias.zero_()
    # 4 heads on a ring: directions (1, 0), (0, 1), (-1, 0), (0, -1) (one pixel each)
    h, w = 7, 7
    value = torch.randn(1, 16, h, w)
    query = torch.randn(1, h * w, 16)
    out = attn(query, grid_reference(h, w, 1, query), value)
    v = _projected(attn, value)[0]  # h x w x 16, heads of 4 channels
    shifts = [(0, 1), (1, 0), (0, -1), (-1, 0)]  # (dy, dx) per head
    expected = torch.zeros(h, w, 16)
    for hd, (dy, dx) in enumerate(shifts):
        for y in range(1, h - 1):
            for x in range(1, w - 1):
                expected[y, x, 4 * hd:4 * hd + 4] = v[y + dy, x + dx, 4 * hd:4 * hd + 4]
    got = out.reshape(h, w, 16)
    assert torch.allclose(got[1:-1, 1:-1], expected[1:-1, 1:-1], atol=1e-5)


def test_deformable_attention_known_offset_reads_expected_location():
    torch.manual_seed(0)
    attn = DeformableAttention(16, num_heads=2, num_points=2, offset_init="zero")
    with torch.no_grad():
        attn.sampling_offsets.bias.copy_(torch.tensor([2.0, -1.0]).repeat(4))  # every head/point: dx=+2, dy=-1
    h, w = 8, 9
    value = torch.randn(1, 16, h, w)
    query = torch.randn(1, h * w, 16)
    out = attn(query, grid_reference(h, w, 1, query), value).reshape(h, w, 16)
    v = attn.out_proj(_projected(attn, value)[0])  # h x w x 16: what a pixel would read of itself
    assert torch.allclose(out[1:, :-2], v[:-1, 2:], atol=1e-5)
    assert not torch.allclose(out[1:, :-2], v[1:, :-2], atol=1e-3)
    # half a pixel to the right reads the mean of two horizontal neighbours (bilinear)
    with torch.no_grad():
        attn.sampling_offsets.bias.copy_(torch.tensor([0.5, 0.0]).repeat(4))
    out = attn(query, grid_reference(h, w, 1, query), value).reshape(h, w, 16)
    assert torch.allclose(out[:, :-1], (v[:, :-1] + v[:, 1:]) / 2, atol=1e-5)


def test_value_se_gate_scales_channels_by_token_mean():
    torch.manual_seed(0)
    se = ValueSEGate(8, reduction=4)
    x = torch.randn(2, 10, 8)
    gate = torch.sigmoid(se.fc2(torch.relu(se.fc1(x.mean(1)))))
    assert torch.allclose(se(x), x * gate[:, None])
    with torch.no_grad():
        se.fc2.bias.fill_(-30.0)
        se.fc2.weight.zero_()
    assert se(x).abs().max() < 1e-10  # the gate can close channels


def _point_spread(attn: DeformableAttention) -> tuple[float, float]:
    """Largest difference between the learned query maps of two sampling points of one head: (offsets, weights)."""
    heads, k = attn.num_heads, attn.num_points
    off = attn.sampling_offsets.weight.detach().reshape(heads, k, 2, -1)
    att = attn.attention_weights.weight.detach().reshape(heads, k, -1)
    return (float((off[:, :, None] - off[:, None]).abs().amax()),
            float((att[:, :, None] - att[:, None]).abs().amax()))


def _train_fusion(offset_init: str, steps: int = 6) -> DeformableSEFusion:
    torch.manual_seed(0)
    fusion = DeformableSEFusion(32, num_heads=4, num_points=3, mlp_dim=64, offset_init=offset_init)
    e, d, pe = torch.randn(2, 32, 8, 8), torch.randn(2, 32, 8, 8), torch.randn(1, 32, 8, 8)
    target = torch.randn(2, 32, 8, 8)
    opt = torch.optim.Adam(fusion.parameters(), lr=1e-2)
    for _ in range(steps):
        opt.zero_grad()
        (fusion(e, d, pe) - target).square().mean().backward()
        opt.step()
    return fusion


def test_sampling_points_of_a_head_learn_apart():
    """With the default (ring) init, the K points of every head learn different offsets and weights within a few
    Adam steps; all-zero init keeps them identical (K copies of one point), which is why it is not the default."""
    attns = [m for m in _train_fusion("ring").modules() if isinstance(m, DeformableAttention)]
    assert len(attns) == 3  # self-attention and both cross-attentions
    for attn in attns:
        for h in range(attn.num_heads):  # every head, every pair of its points
            off = attn.sampling_offsets.weight.reshape(attn.num_heads, attn.num_points, -1)[h]
            att = attn.attention_weights.weight.reshape(attn.num_heads, attn.num_points, -1)[h]
            for i in range(attn.num_points):
                for j in range(i):
                    assert (off[i] - off[j]).abs().max() > 1e-3, (h, i, j)
                    assert (att[i] - att[j]).abs().max() > 1e-3, (h, i, j)
    for attn in (m for m in _train_fusion("zero").modules() if isinstance(m, DeformableAttention)):
        assert attn.sampling_offsets.weight.abs().max() > 1e-3  # it did train ...
        assert max(_point_spread(attn)) < 1e-6  # ... but its points never separated


@pytest.mark.parametrize("attention", ["se", "deformable_se"])
def test_two_way_block_shapes_and_zero_init_fusion(attention):
    torch.manual_seed(0)
    block = DeformableTwoWayBlock(32, num_heads=4, num_points=2, mlp_dim=64, attention=attention, kv_grid=4)
    q, k, pe = torch.randn(2, 32, 8, 8), torch.randn(2, 32, 8, 8), torch.randn(1, 32, 8, 8)
    q2, k2 = block(q, k, pe, pe)
    assert q2.shape == q.shape and k2.shape == k.shape
    fusion = DeformableSEFusion(32, depth=2, num_heads=4, num_points=2, mlp_dim=64, attention=attention, kv_grid=4)
    assert torch.equal(fusion(k, q, pe), k)  # E' = E at initialisation
    fusion(k, q, pe).square().sum().backward()
    assert fusion.out.weight.grad.abs().sum() > 0
    with pytest.raises(ConfigError):
        DeformableTwoWayBlock(32, num_heads=4, attention="vanilla")


# --- Swin-U prompt encoder -------------------------------------------------------------------------------------------
def test_swin_u_prompt_encoder_stage_choice_and_shapes():
    torch.manual_seed(0)
    # the release's geometry: P = 512, patch 4 -> stage grids 128, 64, 32, 16; decoder from the 64 x 64 stage
    enc = SwinUPromptEncoder(512, (64, 64), out_dim=256, embed_dim=8, depths=(1, 1, 1, 1), num_heads=(1, 1, 2, 2))
    assert enc.grids == [128, 64, 32, 16] and enc.first_used == 1 and len(enc.ups) == 2
    feats = enc.stage_outputs(torch.rand(1, 3, 512, 512))
    assert [tuple(f.shape[1:]) for f in feats] == [(8, 128, 128), (16, 64, 64), (32, 32, 32), (64, 16, 16)]
    d = enc(torch.rand(1, 3, 512, 512))
    assert d.shape == (1, 256, 64, 64) and d.abs().max() <= 1
    # a prompt branch coarser than the embedding grid: every stage used, then resized
    enc = SwinUPromptEncoder(64, (32, 32), out_dim=256, embed_dim=8, depths=(1, 1), num_heads=(1, 2))
    assert enc.first_used == 0 and enc(torch.rand(2, 3, 64, 64)).shape == (2, 256, 32, 32)
    with pytest.raises(ConfigError):
        SwinUPromptEncoder(100, (16, 16), embed_dim=8, depths=(1, 1, 1, 1), num_heads=(1, 1, 1, 1))


def test_swin_b_release_sizes():
    """The release's Swin-B branch: ~86.7M Swin parameters and a 9.44M SmallDecoder (METHODS.md 1.2)."""
    with torch.device("meta"):  # shapes only: no memory, no initialisation work
        enc = SwinUPromptEncoder(512, (64, 64), 256, 128, (2, 2, 18, 2), (4, 8, 16, 32), drop_path=0.3)
    count = lambda *ms: sum(p.numel() for m in ms for p in m.parameters())  # noqa: E731
    assert count(enc.patch_embed, enc.stages, enc.norms) == pytest.approx(86.7e6, rel=0.01)
    assert count(enc.ups, enc.head) == pytest.approx(9.44e6, rel=0.01)


# --- the method on the tiny backbone ---------------------------------------------------------------------------------
def test_shapes_predict_and_config_errors(tiny_backbone):
    m = make(tiny_backbone, light_decoder=True)
    batch = tiny_batch()
    out = m(batch)
    assert out["logits"].shape == (2, 1, 64, 64)  # 4 x the 16 x 16 grid
    assert out["dense"].shape == (2, 256, 16, 16)
    assert out["light_logits"].shape == (2, 1, 64, 64)
    m.eval()
    for decoder in ("full", "light"):
        p = m.predict(batch, decoder=decoder)
        assert p.shape == (2, 2, 64, 64) and torch.allclose(p.sum(1), torch.ones(2, 64, 64))
    assert m.prompt_size == 64  # min(8 x 16, 64)
    with pytest.raises(ConfigError):
        make(tiny_backbone, fusion="vanilla")
    with pytest.raises(ConfigError):
        make(tiny_backbone, inference_decoder="light")  # no light head trained
    with pytest.raises(ConfigError):
        make(tiny_backbone).predict(batch, decoder="light")
    with pytest.raises(ConfigError):
        make(tiny_backbone, unknown_option=1)
    base = build_method("hetersam", tiny_backbone, {"swin_preset": "base", "prompt_size": 32})
    assert base.config.embed_dim == 128 and base.config.depths == (2, 2, 18, 2)


@pytest.mark.parametrize("fusion", ["none", "se", "deformable_se"])
def test_only_prompt_and_fusion_train_frozen_sam_unchanged(tiny_backbone, fusion):
    m = make(tiny_backbone, fusion=fusion)
    trainable = {n for n, _ in m.trainable_parameters()}
    assert trainable and all(n.startswith(("prompt_encoder.", "fusion.")) for n in trainable)
    assert any(n.startswith("fusion.") for n in trainable) == (fusion != "none")
    frozen = {k: v.clone() for k, v in m.backbone.state_dict().items()}
    opt = torch.optim.Adam([p for _, p in m.trainable_parameters()], lr=1e-3)
    batch = tiny_batch()
    for _ in range(2):  # two steps: the zero-initialised fusion output opens after the first
        opt.zero_grad()
        m.loss(m(batch), batch)["loss"].backward()
        assert all(p.grad is None for p in m.backbone.parameters())
        opt.step()
    # gradients flowed through the frozen decoder into the prompt encoder and every fusion part
    for name, p in m.named_parameters():
        if name.startswith(("prompt_encoder.patch_embed", "prompt_encoder.head.0", "fusion.out",
                            "fusion.blocks.0.norm4")):
            assert p.grad is not None and p.grad.abs().sum() > 0, name
    if fusion != "none":
        assert m.fusion.blocks[0].cross_attn_key_to_query.out_proj.weight.grad.abs().sum() > 0
    after = m.backbone.state_dict()
    assert all(torch.equal(frozen[k], after[k]) for k in frozen)
    m.train()
    assert not m.backbone.training and m.prompt_encoder.training


@pytest.mark.parametrize("fusion", ["none", "se", "deformable_se"])
def test_each_fusion_switch_trains(tiny_backbone, fusion):
    m = make(tiny_backbone, fusion=fusion).train()
    opt = torch.optim.Adam([p for _, p in m.trainable_parameters()], lr=3e-3)
    batch = tiny_batch()
    losses = train_steps(m, batch, opt, 12)
    # the random tiny decoder responds weakly to the dense prompt alone (fusion=none falls ~0.06 in 12 steps,
    # the fusion settings ~0.3); without training the loss on this fixed batch would not move at all
    assert losses[-1] < losses[0] - 0.04 and losses[-1] == pytest.approx(min(losses), abs=0.02), losses


def test_light_decoder_detached_and_trainable(tiny_backbone):
    batch = tiny_batch()
    for detach in (True, False):
        m = make(tiny_backbone, light_decoder=True, light_detach=detach)
        out = m(batch)
        terms = m.loss(out, batch)
        assert {"bce", "dice", "light_bce", "light_dice", "light_distil"} <= set(terms)
        (terms["light_bce"] + terms["light_dice"] + terms["light_distil"]).backward()
        grad = m.prompt_encoder.patch_embed.weight.grad
        assert (grad is None or grad.abs().sum() == 0) == detach
        assert m.light_head.net[0].weight.grad.abs().sum() > 0
    # the light head does not change the full path (same init, same logits)
    a, b = make(tiny_backbone, light_decoder=True).eval(), make(tiny_backbone).eval()
    assert torch.equal(a(batch)["logits"], b(batch)["logits"])


def test_light_phase_distils_the_light_head_alone(tiny_backbone):
    m = make(tiny_backbone, fusion="none", light_decoder=True, light_epochs=2).train()
    m.on_epoch_start(1, 4)
    assert not m.light_phase and m.prompt_encoder.training
    m.on_epoch_start(2, 4)  # the last 2 of 4 epochs
    assert m.light_phase and not m.prompt_encoder.training and m.light_head.training
    m.train()  # as after a validation: the teacher stays in eval mode
    assert not m.prompt_encoder.training
    frozen = {k: v.clone() for k, v in m.state_dict().items() if not k.startswith("light_head.")}
    opt = torch.optim.Adam([p for _, p in m.trainable_parameters()], lr=3e-3)  # as the engine: every part
    batch = tiny_batch()
    light = []
    for _ in range(8):
        opt.zero_grad()
        out = m(batch)
        terms = m.loss(out, batch)
        expected = terms["light_bce"] + terms["light_dice"] + terms["light_distil"]
        assert torch.allclose(terms["loss"], expected)  # the full path's terms do not count
        teacher = torch.sigmoid(out["logits"])
        assert torch.allclose(terms["light_distil"],
                              torch.nn.functional.binary_cross_entropy_with_logits(out["light_logits"], teacher))
        terms["loss"].backward()
        assert all(p.grad is None for n, p in m.named_parameters() if not n.startswith("light_head."))
        opt.step()
        light.append(float(terms["light_bce"] + terms["light_dice"]))
    assert light[-1] < light[0] - 0.05, light  # the light head learns while the rest stays as it was
    after = m.state_dict()
    assert all(torch.equal(v, after[k]) for k, v in frozen.items())  # BatchNorm statistics included
    with pytest.raises(ConfigError):
        make(tiny_backbone, light_epochs=1)  # no light head to train


def test_light_phase_through_the_engine(tiny_backbone, tmp_path):
    """epochs 3, light_epochs 1: the last epoch changes only the light head; the checkpoints hold the full path too
    and are chosen on the light head's validation Dice."""
    from synthetic import Discs

    from samadapt.engine.checkpoint import load_checkpoint
    from samadapt.config.run_config import TrainConfig
    from samadapt.engine.trainer import Trainer

    m = make(tiny_backbone, fusion="none", light_decoder=True, light_epochs=1, inference_decoder="light")
    seen = {}
    start = m.on_epoch_start

    def spy(epoch, epochs):
        start(epoch, epochs)
        seen[epoch] = m.light_phase
        if m.light_phase and "state" not in seen:
            seen["state"] = {k: v.clone() for k, v in m.state_dict().items()}

    m.on_epoch_start = spy
    cfg = TrainConfig(epochs=3, batch_size=4, lr=3e-3, optimizer="adam", scheduler="constant", seed=0)
    manifest = {"method": {"name": "hetersam"}, "backbone": {"name": "tiny", "weights_id": tiny_backbone.weights_id}}
    result = Trainer(m, cfg, tmp_path / "run", manifest, torch.device("cpu")).fit(Discs(4), Discs(2, seed=1))
    assert [seen[e] for e in range(3)] == [False, False, True]
    state, after = seen["state"], m.state_dict()
    assert all(torch.equal(v, after[k]) for k, v in state.items() if not k.startswith("light_head."))
    assert any(not torch.equal(v, after[k]) for k, v in state.items() if k.startswith("light_head."))
    fresh = make(tiny_backbone, fusion="none", light_decoder=True, inference_decoder="light").eval()
    load_checkpoint(fresh, result.last_checkpoint)
    batch = tiny_batch()
    assert torch.allclose(fresh.predict(batch), m.eval().predict(batch), atol=1e-6)
    assert result.best_metric == max(h["val_dice"] for h in result.history)


def test_loss_and_faithful_minmax(tiny_backbone):
    target = torch.zeros(2, 1, 8, 8)
    target[:, :, 2:6, 2:6] = 1
    assert soft_dice_loss(target, target) < 1e-6
    assert soft_dice_loss(1 - target, target) > 0.9
    logits = torch.randn(2, 1, 8, 8) * 3
    m = minmax_normalise(logits)
    assert torch.allclose(m.flatten(1).min(1).values, torch.zeros(2))
    assert torch.allclose(m.flatten(1).max(1).values, torch.ones(2))

    batch = tiny_batch()
    fixed, faithful = make(tiny_backbone), make(tiny_backbone, faithful=True)
    out = fixed(batch)
    t = (batch["label"] > 0).float()[:, None]
    terms = fixed.loss(out, batch)
    assert torch.allclose(terms["bce"], torch.nn.functional.binary_cross_entropy(torch.sigmoid(out["logits"]), t),
                          atol=1e-5)
    terms_f = faithful.loss(out, batch)
    assert torch.allclose(terms_f["bce"], torch.nn.functional.binary_cross_entropy(minmax_normalise(out["logits"]), t),
                          atol=1e-5)
    assert not torch.allclose(terms["loss"], terms_f["loss"])
    faithful.eval()
    p = faithful.predict(batch)[:, 1]
    assert torch.allclose(p.flatten(1).max(1).values, torch.ones(2))  # the release always predicts a pixel at 1


def test_double_normalise_encodes_the_twice_normalised_image():
    from samadapt.backbones import build_backbone
    from samadapt.backbones.base import Features

    bb = build_backbone("tiny")  # with SAM's pixel statistics (the tiny backbone's own are mean 0, std 1)
    bb.pixel_scale = 255.0
    bb.pixel_mean.copy_(torch.tensor([123.675, 116.28, 103.53]).view(1, 3, 1, 1))
    bb.pixel_std.copy_(torch.tensor([58.395, 57.12, 57.375]).view(1, 3, 1, 1))
    batch = tiny_batch()
    once, twice = make(bb).eval(), make(bb, double_normalise=True).eval()  # the same weights
    x = bb.preprocess(batch["image"])
    with torch.no_grad():
        e_twice = bb.encode((x - bb.pixel_mean) / bb.pixel_std).embedding
        logits = twice(batch)["logits"]
        # the prompt branch still sees the once-normalised image: only the encoder input differs
        assert torch.allclose(logits, once(dict(batch, features=Features(e_twice)))["logits"], atol=1e-5)
        assert not torch.allclose(logits, once(batch)["logits"], atol=1e-3)
    with pytest.raises(ConfigError, match="data.cache=off"):
        twice(dict(batch, features=once.features(batch)))


def test_checkpoint_round_trip_keeps_batchnorm_stats(tiny_backbone, tmp_path):
    from samadapt.engine.checkpoint import load_checkpoint, save_checkpoint

    m = make(tiny_backbone, light_decoder=True)
    batch = tiny_batch()
    m.train()
    m(batch)  # updates BatchNorm running statistics
    m.eval()
    expected = m.predict(batch), m.predict(batch, decoder="light")
    save_checkpoint(m, tmp_path / "c.safetensors", {"method": {"name": "hetersam"}})
    fresh = make_method("hetersam", tiny_backbone, seed=1, light_decoder=True).eval()
    assert not torch.allclose(fresh.predict(batch), expected[0])
    load_checkpoint(fresh, tmp_path / "c.safetensors")
    assert torch.allclose(fresh.predict(batch), expected[0], atol=1e-6)
    assert torch.allclose(fresh.predict(batch, decoder="light"), expected[1], atol=1e-6)


def test_features_from_cache_are_used(tiny_backbone):
    m = make(tiny_backbone).eval()
    batch = tiny_batch()
    feats = m.features(batch)
    with_cache = m(dict(batch, features=feats))["logits"]
    assert torch.allclose(with_cache, m(batch)["logits"], atol=1e-5)
    from samadapt.backbones.base import Features

    other = m(dict(batch, features=Features(feats.embedding + 1.0)))["logits"]
    assert not torch.allclose(other, with_cache)


# --- integration: real weights, real data ----------------------------------------------------------------------------
@pytest.mark.integration
def test_litemedsam_real_brain_slices_loss_falls(litemedsam_backbone, real_brain_batch):
    torch.manual_seed(0)
    m = build_method("hetersam", litemedsam_backbone, {
        "fusion": "deformable_se", "embed_dim": 24, "depths": [1, 1, 1, 1], "num_heads": [1, 2, 4, 8],
        "fusion_mlp_dim": 128, "drop_path": 0.0, "light_decoder": True}).train()
    batch = {"image": real_brain_batch["image"], "label": real_brain_batch["label"]}
    batch["features"] = m.features(batch)  # as the engine's embedding cache would hand them over
    opt = torch.optim.Adam([p for _, p in m.trainable_parameters()], lr=1e-3)
    losses = []
    for _ in range(6):
        opt.zero_grad()
        terms = m.loss(m(batch), batch)
        terms["loss"].backward()
        opt.step()
        losses.append((float(terms["bce"] + terms["dice"]), float(terms["light_bce"] + terms["light_dice"])))
    assert losses[-1][0] < 0.8 * losses[0][0], losses
    assert losses[-1][1] < losses[0][1], losses


def test_multi_class_runs_one_vs_rest(tiny_backbone):
    m = make_method("hetersam", tiny_backbone, 2, fusion="none")
    batch = tiny_batch()
    batch["label"][:, 30:40, 30:40] = 2
    m.loss(m(batch), batch)["loss"].backward()
    m.eval()
    assert m.predict(batch).shape == (2, 3, 64, 64)
    assert not any(h.backbone.training for h in m.heads)
