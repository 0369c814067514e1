"""RunDir: the run folder of `samadapt train` read back (checkpoints, state, log, manifest, config), a run folder or a
checkpoint file resolved to the checkpoint to load, and the layout spelt in one module only."""

import re
import shutil
from pathlib import Path

import pytest

from samadapt.config.run_config import load_config
from samadapt.engine.predict import Predictor
from samadapt.engine.rundir import RunDir, checkpoint_config, resolve_checkpoint
from samadapt.errors import CheckpointError, InputError
from synthetic import write_disc_pictures

PACKAGE = Path(__file__).resolve().parents[2] / "samadapt"


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A real one-epoch run folder of the tiny decoder on disc pictures, and the config it was trained with."""
    from samadapt.engine.run import train

    root = tmp_path_factory.mktemp("rundir")
    (root / "discs").mkdir()
    data = write_disc_pictures(root / "discs", 8, (48, 56), 0, "case{:02d}", (15, 35, 15, 40), (6, 12))
    cfg = load_config("decoder_tiny", [f"data.path={data}", f"output={root / 'run'}", "train.epochs=1",
                                       "train.device=cpu", "data.cache=off", "train.batch_size=4"])
    train(cfg)
    return RunDir(root / "run"), cfg


def test_reads_a_trained_run_folder(trained):
    run, cfg = trained
    assert run.best_checkpoint == run.path / "checkpoints" / "best.safetensors" and run.best_checkpoint.is_file()
    assert run.last_checkpoint.is_file() and run.state.is_file() and run.log_csv.is_file()
    assert run.is_trained() and run.trained_epochs() == 1
    assert run.manifest["training"]["epochs_run"] == 1 and run.manifest["method"]["name"] == "decoder"
    (row,) = run.history()
    assert row["epoch"] == 1.0 and row["train_loss"] > 0
    assert all(p.exists() for p in run.outputs)
    assert run.config() == cfg  # config.yaml reads back as the config that trained the run
    config, manifest = checkpoint_config(run.best_checkpoint)
    assert config == cfg and manifest["epoch"] == 1


def test_resolves_a_run_folder_or_a_checkpoint_file(trained):
    run, _ = trained
    best = run.best_checkpoint
    assert resolve_checkpoint(run.path) == best
    assert resolve_checkpoint(best) == best and resolve_checkpoint(best.with_suffix(".json")) == best
    assert resolve_checkpoint(run.last_checkpoint) == run.last_checkpoint
    predictor = Predictor.from_run(run.path, device="cpu")
    assert predictor.method.name == "decoder" and predictor.modality == run.manifest["data"]["source"].get("modality")


def test_folder_without_checkpoints_is_named(trained, tmp_path):
    empty = RunDir(tmp_path / "empty")
    empty.path.mkdir()
    assert not empty.is_trained() and empty.trained_epochs() is None and empty.history() == []
    assert empty.manifest == {}
    with pytest.raises(CheckpointError, match=re.escape(f"{empty.path}: no checkpoints/best.safetensors")):
        resolve_checkpoint(empty.path)
    with pytest.raises(InputError, match=re.escape(f"{empty.config_yaml}: missing")):
        empty.config()
    with pytest.raises(CheckpointError, match=re.escape(f"{tmp_path / 'absent'}: no checkpoints/best.safetensors")):
        resolve_checkpoint(tmp_path / "absent")
    with pytest.raises(CheckpointError, match=re.escape(f"{tmp_path / 'gone.safetensors'}: checkpoint file not found")):
        resolve_checkpoint(tmp_path / "gone.json")

    only_last = RunDir(tmp_path / "interrupted")  # a last checkpoint but no best: only or_last takes it
    only_last.checkpoints.mkdir(parents=True)
    for suffix in (".safetensors", ".json"):
        shutil.copy(trained[0].last_checkpoint.with_suffix(suffix), only_last.last_checkpoint.with_suffix(suffix))
    assert resolve_checkpoint(only_last.path, or_last=True) == only_last.last_checkpoint
    with pytest.raises(CheckpointError, match="no checkpoints/best.safetensors"):
        resolve_checkpoint(only_last.path)


def test_run_folder_layout_is_spelt_in_rundir_only():
    """No module but engine/rundir.py names the checkpoint files, and none outside config/run_config.py reaches
    into its private ``_update`` (the run folder's readers go through RunDir and RunConfig.from_dict)."""
    own = {PACKAGE / "engine" / "rundir.py"}
    spelt = sorted(str(p.relative_to(PACKAGE)) for p in PACKAGE.rglob("*.py") if p not in own
                   and re.search(r"(best|last)\.safetensors", p.read_text()))
    assert spelt == []
    private = sorted(str(p.relative_to(PACKAGE)) for p in PACKAGE.rglob("*.py")
                     if p != PACKAGE / "config" / "run_config.py" and re.search(r"\b_update\b", p.read_text()))
    assert private == []
