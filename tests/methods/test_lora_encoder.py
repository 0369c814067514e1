"""The LoRA methods' encoder: backbone encoder steps, the reused frozen prefix (exact, bypassed with augmentation,
optional) and frozen BatchNorm statistics."""

import pytest
import torch

from samadapt.methods.base import Method
from samadapt.methods.lora_encoder import PrefixReuse, frozen_prefix_length
from support import make_method, square_batch

LORA_METHODS = ("hsam", "samed", "msam")


def _batch(seed: int = 0) -> dict:
    batch = square_batch([(1, 8, 30, 10, 40)], b=2, seed=seed)
    batch["key"] = [f"{seed:02x}{i:02x}" for i in range(2)]
    return batch


def _loss_and_grads(method, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    method.zero_grad(set_to_none=True)
    torch.manual_seed(7)  # the same dropout, noise and click draws in every call
    loss = method.loss(method(batch), batch)["loss"]
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in method.trainable_parameters() if p.grad is not None}


def test_encoder_steps_compose_to_the_encoder(tiny_backbone):
    x = torch.randn(2, 3, 64, 64)
    steps = tiny_backbone.encoder_steps(tiny_backbone.image_encoder)
    out = x
    for step in steps:
        out = step.run(out)
    torch.testing.assert_close(out, tiny_backbone.image_encoder(x), rtol=0, atol=0)
    assert [s.modules for s in steps[:2]] == [("patch_embed", "pos_embed"), ("blocks.0",)]


@pytest.mark.parametrize("name", LORA_METHODS)
def test_reused_prefix_gives_the_same_loss_and_gradients(tiny_backbone, name):
    method = make_method(name, tiny_backbone).train()
    runner = method.encoder_run
    assert runner.prefix_names == ["patch_embed", "pos_embed"]  # every ViT block has LoRA
    batch = _batch()
    loss_full, grads_full = _loss_and_grads(method, batch)
    assert type(method).set_fixed_inputs is not Method.set_fixed_inputs  # not the base no-op
    note = method.set_fixed_inputs(True)
    assert "patch_embed, pos_embed" in note and "reused" in note
    _loss_and_grads(method, batch)  # fills the store
    assert (runner.misses, runner.hits, len(runner.store)) == (2, 0, 2)
    loss_reused, grads_reused = _loss_and_grads(method, batch)
    assert (runner.misses, runner.hits) == (2, 2)
    torch.testing.assert_close(loss_reused, loss_full)
    assert grads_reused.keys() == grads_full.keys() and any("lora" in n for n in grads_full)
    for n in grads_full:
        torch.testing.assert_close(grads_reused[n], grads_full[n], msg=n)
    method.set_fixed_inputs(False)  # the engine, after training: the memory goes
    assert not runner.active and not runner.store


def test_a_half_cached_batch_equals_the_full_encoder(tiny_backbone):
    method = make_method("samed", tiny_backbone).eval()
    method.set_fixed_inputs(True)
    batch = _batch()
    with torch.no_grad():
        method.features({"image": batch["image"][:1], "key": batch["key"][:1]})
        reused = method.features(batch).embedding
        full = method.image_encoder(tiny_backbone.preprocess(batch["image"]))
    assert method.encoder_run.hits == 1 and method.encoder_run.misses == 2
    torch.testing.assert_close(reused, full)


def test_augmentation_bypasses_the_reuse(tiny_backbone):
    method = make_method("hsam", tiny_backbone).train()
    note = method.set_fixed_inputs(False)  # what the engine says when data.augment is set
    assert "augmentation" in note and "recomputed every step" in note
    _loss_and_grads(method, _batch())
    runner = method.encoder_run
    assert not runner.active and not runner.store and runner.misses == runner.hits == 0


def test_the_option_turns_the_reuse_off(tiny_backbone):
    method = make_method("samed", tiny_backbone, prefix_cache=False).train()
    assert method.set_fixed_inputs(True) is None
    _loss_and_grads(method, _batch())
    assert not method.encoder_run.active and not method.encoder_run.store


def test_the_memory_limit_keeps_what_fits(tiny_backbone):
    method = make_method("samed", tiny_backbone, prefix_cache_mb=0.3).eval()  # one 16 x 16 x 64 map is 64 KiB
    method.set_fixed_inputs(True)
    with torch.no_grad():
        for seed in range(4):
            method.features(_batch(seed))
    runner = method.encoder_run
    assert len(runner.store) == 4 and runner.bytes <= runner.max_bytes


def test_engine_tells_the_method_and_clears_after_training(tmp_path, monkeypatch):
    from samadapt.config.run_config import load_config
    from samadapt.engine.run import train
    from synthetic import write_disc_pictures

    seen = []
    original = PrefixReuse.set_fixed_inputs

    def spy(self, fixed, method):
        seen.append((fixed, self.active, len(self.store)))
        return original(self, fixed, method)

    monkeypatch.setattr(PrefixReuse, "set_fixed_inputs", spy)
    (tmp_path / "discs").mkdir()
    data = write_disc_pictures(tmp_path / "discs", 8, (48, 56), 0, "case{:02d}", (15, 35, 15, 40), (6, 12))
    for augment, reused in (("none", True), ("light", False)):
        seen.clear()
        cfg = load_config("samed_cpu", [f"data.path={data}", "backbone.name=tiny", f"data.augment={augment}",
                                        "train.epochs=1", "train.batch_size=4",
                                        f"output={tmp_path / augment}"])
        train(cfg)
        (before, after) = seen
        assert before == (reused, False, 0)
        assert after[0] is False and after[1] is reused and (after[2] > 0) is reused  # stored while training


def test_lite_medsam_prefix_and_frozen_batchnorm(litemedsam_backbone):
    method = make_method("samed", litemedsam_backbone).train()
    encoder = method.image_encoder
    steps = litemedsam_backbone.encoder_steps(encoder)
    assert frozen_prefix_length(encoder, steps) == 2  # patch embedding and the convolutional stage 0
    bn = [m for m in encoder.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert bn and not any(m.training for m in bn)
    before = [m.running_mean.clone() for m in bn]
    method.set_fixed_inputs(True)
    image = torch.rand(1, 3, 256, 256)
    batch = {"image": image, "key": ["ab"]}
    with torch.no_grad():
        first = method.features(batch).embedding  # computed step by step, prefix kept
        reused = method.features(batch).embedding
        full = encoder(image)
    assert (method.encoder_run.misses, method.encoder_run.hits) == (1, 1)
    torch.testing.assert_close(first, full, rtol=0, atol=0)
    torch.testing.assert_close(reused, full, rtol=0, atol=0)
    assert all(torch.equal(m.running_mean, b) for m, b in zip(bn, before))  # statistics untouched by training


def test_cost_benchmark_times_the_reused_prefix(tmp_path, mni152_brain_dataset, monkeypatch):
    from samadapt.bench import cost

    stored = []
    original = PrefixReuse.__call__

    def spy(self, x, keys=None):
        out = original(self, x, keys)
        stored.append((self.active, self.hits))
        return out

    monkeypatch.setattr(PrefixReuse, "__call__", spy)
    row = cost.train_step("samed", mni152_brain_dataset, tmp_path, cache=True, steps=1, backbone="tiny")
    assert row["step_s"] is not None and row["rss"] is not None
    assert stored[0] == (True, 0) and stored[-1][1] > 0  # the second epoch reads the prefix kept by the first


@pytest.mark.parametrize("name", LORA_METHODS)
def test_frozen_batchnorm_stays_in_eval_mode_in_training(litemedsam_backbone, name):
    method = make_method(name, litemedsam_backbone).train()
    encoders = [m.image_encoder for m in getattr(method, "heads", [method])]
    bn = [m for enc in encoders for m in enc.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert bn and not any(m.training for m in bn)
    inside = {id(m) for enc in encoders for m in enc.modules()}
    trainable = [m for m in method.modules()
                 if id(m) not in inside and any(p.requires_grad for p in m.parameters(recurse=False))]
    assert trainable and all(m.training for m in trainable)  # the decoder parts that learn are in train mode
