import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from samadapt.backbones import build_backbone
from samadapt.engine.checkpoint import load_checkpoint, save_checkpoint
from samadapt.config.run_config import TrainConfig
from samadapt.engine.schedulers import lr_factor
from samadapt.engine.trainer import Trainer
from samadapt.errors import CheckpointError
from samadapt.methods import build_method
from synthetic import Discs

CPU = torch.device("cpu")


def _train(tmp_path, epochs, resume=False, name="run", method="decoder"):
    torch.manual_seed(0)  # the engine seeds before building the method; do the same here
    backbone = build_backbone("tiny")
    m = build_method(method, backbone, {}, 1)
    cfg = TrainConfig(epochs=epochs, batch_size=4, lr=1e-3, seed=3)
    manifest = {"method": {"name": method}, "backbone": {"name": "tiny", "weights_id": backbone.weights_id}}
    trainer = Trainer(m, cfg, tmp_path / name, manifest, CPU)
    return m, trainer.fit(Discs(16), Discs(4, seed=1), resume=resume)


def test_training_lowers_loss_and_writes_checkpoints(tmp_path):
    _, res = _train(tmp_path, 5)
    losses = [h["train_loss"] for h in res.history]
    assert losses[-1] < 0.6 * losses[0]
    assert res.history[-1]["val_dice"] > 0.5
    assert res.best_checkpoint.is_file() and res.last_checkpoint.is_file()
    manifest = json.loads(res.best_checkpoint.with_suffix(".json").read_text())
    assert manifest["backbone"]["name"] == "tiny" and "val_dice" in manifest["metrics"]
    # adapter-only: no frozen encoder weights in the file
    keys = load_file(str(res.last_checkpoint)).keys()
    assert keys and not any(k.startswith("backbone.image_encoder") for k in keys)
    assert (tmp_path / "run" / "log.csv").read_text().count("\n") == 6


def test_loss_terms_are_logged(tmp_path):
    """A method's other loss terms (ProMISe: bce, dice) are averaged per epoch into the history and TensorBoard
    (``train/<term>``); the console line and log.csv keep the total loss only."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    _, res = _train(tmp_path, 2, method="promise")
    terms = res.history[-1]["train_terms"]
    assert set(terms) == {"bce", "dice"} and all(v > 0 for v in terms.values())
    assert terms["bce"] + terms["dice"] == pytest.approx(res.history[-1]["train_loss"], rel=1e-4)
    events = EventAccumulator(str(tmp_path / "run" / "tensorboard"))
    events.Reload()
    assert [e.step for e in events.Scalars("train/bce")] == [1, 2]
    assert "train_terms" not in (tmp_path / "run" / "log.csv").read_text()


def test_resume_is_exact(tmp_path, monkeypatch):
    straight, _ = _train(tmp_path, 4, name="straight")
    import samadapt.engine.trainer as trainer_module

    real_save = trainer_module.save_training_state

    def save_then_crash(path, state):  # simulate a kill right after epoch 2 was saved
        real_save(path, state)
        if state["epoch"] == 1:
            raise KeyboardInterrupt

    monkeypatch.setattr(trainer_module, "save_training_state", save_then_crash)
    with pytest.raises(KeyboardInterrupt):
        _train(tmp_path, 4, name="split")
    monkeypatch.setattr(trainer_module, "save_training_state", real_save)
    resumed, res = _train(tmp_path, 4, resume=True, name="split")
    assert [h["epoch"] for h in res.history] == [1, 2, 3, 4]
    for (n, a), (_, b) in zip(straight.trainable_parameters(), resumed.trainable_parameters()):
        assert torch.equal(a, b), n


def test_checkpoint_load_fails_loudly(tmp_path, tiny_backbone):
    m = build_method("decoder", tiny_backbone, {}, 1)
    path = save_checkpoint(m, tmp_path / "c.safetensors", {"backbone": {"name": "tiny", "weights_id": "random-0"}})
    other = build_method("decoder", tiny_backbone, {}, 1)
    load_checkpoint(other, path)  # the round trip works
    for k, v in other.state_dict().items():
        if k in load_file(str(path)):
            assert torch.equal(v, m.state_dict()[k])
    tensors = load_file(str(path))
    dropped = sorted(tensors)[0]
    save_file({k: v for k, v in tensors.items() if k != dropped}, str(path))
    with pytest.raises(CheckpointError, match="missing keys.*" + dropped.replace(".", r"\.")):
        load_checkpoint(other, path)
    save_file({"foo.bar": torch.zeros(1)}, str(path))
    with pytest.raises(CheckpointError, match="no key matches"):
        load_checkpoint(other, path)
    with pytest.raises(CheckpointError, match="trained on backbone tiny"):
        load_checkpoint(other, path, expect_backbone={"name": "litemedsam", "weights_id": "abc"})
    (tmp_path / "broken.safetensors").write_bytes(b"garbage")
    (tmp_path / "broken.json").write_text("{}")
    with pytest.raises(CheckpointError, match="broken.safetensors"):
        load_checkpoint(other, tmp_path / "broken.safetensors")


def test_unet_and_multiclass_train(tmp_path):
    backbone = build_backbone("tiny")
    for name in ("unet", "decoder"):
        m = build_method(name, backbone, {}, 2)
        res = Trainer(m, TrainConfig(epochs=4, batch_size=4, lr=3e-3), tmp_path / name, {}, CPU).fit(
            Discs(12, num_classes=2), Discs(4, num_classes=2, seed=1))
        assert res.history[-1]["train_loss"] < res.history[0]["train_loss"]
        assert "val_dice_class2" in res.history[-1]


@pytest.mark.parametrize("sched", ["constant", "poly", "warmup_poly", "multistep", "cosine"])
def test_schedules(sched):
    cfg = TrainConfig(scheduler=sched, warmup_steps=10 if sched == "warmup_poly" else 0, milestones=(0.5,))
    f = [lr_factor(s, 100, cfg) for s in range(100)]
    assert all(0 <= x <= 1 for x in f)
    if sched == "warmup_poly":
        assert f[0] == pytest.approx(0.1) and f[9] == pytest.approx(1.0) and f[99] < 0.05
    if sched == "multistep":
        assert f[49] == 1.0 and f[50] == pytest.approx(0.1)
    if sched == "poly":
        assert f[0] == 1.0 and f[50] == pytest.approx(0.5 ** 0.9)


def test_time_budget_stops_inside_an_epoch_and_still_validates(tmp_path):
    backbone = build_backbone("tiny")
    m = build_method("decoder", backbone, {}, 1)
    cfg = TrainConfig(epochs=50, batch_size=2, lr=1e-3, max_minutes=1e-6, val_every=5)
    losses = []
    real_loss = m.loss
    m.loss = lambda output, batch: losses.append(m.training) or real_loss(output, batch)
    res = Trainer(m, cfg, tmp_path / "budget", {}, CPU).fit(Discs(16), Discs(4, seed=1))
    assert len(res.history) == 1 and res.stopped_early and sum(losses) == 1  # 1 of the epoch's 8 steps
    assert "val_dice" in res.history[0] and res.best_checkpoint.is_file()


def test_validation_every_n_steps_groups_short_epochs(tmp_path):
    """8 items at batch 4 = 2 steps per epoch: val_every_steps=5 validates every 3rd epoch (ceil(5 / 2))."""
    backbone = build_backbone("tiny")
    m = build_method("decoder", backbone, {}, 1)
    cfg = TrainConfig(epochs=7, batch_size=4, lr=1e-3, val_every_steps=5)
    res = Trainer(m, cfg, tmp_path / "steps", {}, CPU).fit(Discs(8), Discs(4, seed=1))
    validated = [h["epoch"] for h in res.history if "val_dice" in h]
    assert validated == [3, 6] and [h["steps"] for h in res.history][:3] == [2, 4, 6]


@pytest.mark.parametrize("select_on, best_epoch", [("dice", 2), ("loss", 3)])
def test_best_checkpoint_follows_the_selection_criterion(tmp_path, monkeypatch, select_on, best_epoch):
    """Scripted validations: Dice peaks at epoch 2, the loss is lowest at epoch 3; best.* is that epoch's weights."""
    import samadapt.engine.trainer as trainer_module
    from samadapt.engine.checkpoint import adapter_state, read_manifest

    scripted = iter([{"dice": 0.5, "loss": 1.0}, {"dice": 0.7, "loss": 1.2}, {"dice": 0.6, "loss": 0.8}])
    monkeypatch.setattr(trainer_module, "validate", lambda *args, **kwargs: next(scripted))
    m = build_method("decoder", build_backbone("tiny"), {}, 1)
    weights = []
    real_publish = Trainer._publish
    monkeypatch.setattr(Trainer, "_publish", lambda self, state, writer, resumed=False: weights.append(
        {k: v.clone() for k, v in adapter_state(self.method).items()}) or real_publish(self, state, writer, resumed))
    cfg = TrainConfig(epochs=3, batch_size=4, lr=1e-3, select_on=select_on)
    res = Trainer(m, cfg, tmp_path / select_on, {}, CPU).fit(Discs(8), Discs(4, seed=1))
    assert read_manifest(res.best_checkpoint)["epoch"] == best_epoch
    best = load_file(str(res.best_checkpoint))
    assert all(torch.equal(best[k], v) for k, v in weights[best_epoch - 1].items())
    assert res.best_metric == [0.5, 0.7, 0.6][best_epoch - 1]  # the chosen epoch's Dice, whatever the criterion
