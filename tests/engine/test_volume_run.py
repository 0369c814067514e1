"""3D M-SAM on whole volumes (``samadapt.engine.volume_run``) with the tiny SAM-Med3D on 40^3 spheres: training
rounds and their files, an exact resume, whole-volume prediction with the input's geometry, clicks, bad input."""

from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from samadapt.engine.checkpoint import checkpoint_digest
from samadapt.engine.rundir import RunDir
from samadapt.data.readers import open_dataset
from samadapt.engine.volume_run import load_run3d, predict3d, train3d, validate, volume_config
from samadapt.errors import CheckpointError, ConfigError, InputError
from synthetic import write_disc_pictures
from volumes3d import FAST, write_spheres


def config(data, out, *sets):
    return volume_config([f"data.path={data}", f"output={out}", "backbone.size=tiny", *FAST, *sets])


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One torch thread: the tiny 3D model's small kernels only lose to thread synchronisation on a busy CPU."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def spheres(tmp_path_factory):
    return write_spheres(tmp_path_factory.mktemp("spheres") / "Dataset001_Spheres")


@pytest.fixture(scope="module")
def trained(spheres, tmp_path_factory):
    out = tmp_path_factory.mktemp("run3d")
    train3d(config(spheres, out, "train.steps=6", "train.lr=3e-3", "train.scheduler=constant", "train.val_clicks=1"))
    return out


def test_rounds_write_the_run_folder_and_resume_continues_exactly(spheres, tmp_path):
    sets = ["train.scheduler=constant", "model.click_mode=random"]  # random training clicks: the RNG state counts
    straight = train3d(config(spheres, tmp_path / "a", "train.steps=4", *sets))
    run = RunDir(tmp_path / "a")
    assert [int(r["step"]) for r in run.history()] == [2, 4] and run.trained_epochs() == 2
    assert 0 <= straight.best_metric <= 1 and all(np.isfinite(r["train_loss"]) for r in straight.history)
    manifest = run.manifest
    assert manifest["kind"] == "msam3d" and manifest["training"]["steps_run"] == 4
    assert manifest["backbone"]["name"] == "sam_med3d" and len(manifest["data"]["split"]["val"]) == 1
    assert json.loads(run.best_checkpoint.with_suffix(".json").read_text())["step"] in (2, 4)

    train3d(config(spheres, tmp_path / "b", "train.steps=2", *sets))
    with pytest.raises(InputError, match="already holds a trained run"):
        train3d(config(spheres, tmp_path / "b", "train.steps=4", *sets))
    with pytest.raises(ConfigError, match="train.steps: 2 -> 4"):
        train3d(config(spheres, tmp_path / "b", "train.steps=4", *sets), resume=True)
    resumed = train3d(config(spheres, tmp_path / "b", "train.steps=4", *sets), resume=True, allow_changes=True)
    assert [int(r["step"]) for r in resumed.history] == [2, 4]
    assert checkpoint_digest(RunDir(tmp_path / "b").last_checkpoint) == checkpoint_digest(run.last_checkpoint)
    assert RunDir(tmp_path / "b").manifest["resumed_with_changes"] == ["train.steps: 2 -> 4"]


def test_whole_volumes_keep_the_input_geometry_and_clicks_change_them(spheres, trained, tmp_path):
    auto = predict3d(trained, spheres, tmp_path / "auto")
    clicked = predict3d(trained, spheres, tmp_path / "clicks", clicks=2)
    assert sorted(p.name for p in auto) == [f"c{i}.nii.gz" for i in range(4)]
    image = sitk.ReadImage(str(spheres / "imagesTr" / "c0_0000.nii.gz"))
    a, c = sitk.ReadImage(str(auto[0])), sitk.ReadImage(str(clicked[0]))
    for out in (a, c):
        assert out.GetSize() == image.GetSize() == (40, 40, 40)
        np.testing.assert_allclose(out.GetSpacing(), image.GetSpacing())
        np.testing.assert_allclose(out.GetOrigin(), image.GetOrigin())
        np.testing.assert_allclose(out.GetDirection(), image.GetDirection())
    arrays = [sitk.GetArrayFromImage(sitk.ReadImage(str(p))) for p in auto + clicked]
    assert set(np.unique(np.concatenate([x.ravel() for x in arrays]))) <= {0, 1}
    assert any((x != y).any() for x, y in zip(arrays[:4], arrays[4:]))  # the clicks are prompts
    meta = json.loads((tmp_path / "clicks" / "prediction.json").read_text())
    assert meta["clicks"] == 2 and meta["cases"] == [f"c{i}" for i in range(4)]


def test_validation_scores_with_simulated_clicks(spheres, trained):
    assert len(RunDir(trained).history()) == 3 and all(0 <= r["val_dice"] <= 1 for r in RunDir(trained).history())
    _, model, _ = load_run3d(trained)
    cases = open_dataset(spheres).load_all()
    assert validate(model, cases, None, 0.5) != validate(model, cases, None, 0.5, clicks=2)


def test_bad_input_is_a_clear_error(spheres, trained, tmp_path):
    with pytest.raises(ConfigError, match="--checkpoint"):  # the official backbone and no weights
        train3d(volume_config([f"data.path={spheres}", f"output={tmp_path / 'r'}"]))
    with pytest.raises(CheckpointError, match="not found"):
        train3d(volume_config([f"data.path={spheres}", f"output={tmp_path / 'r'}",
                               f"backbone.checkpoint={tmp_path / 'missing.pth'}"]))
    wrong = tmp_path / "wrong.pth"
    torch.save({"model_state_dict": {"image_encoder.foo": torch.zeros(2)}}, wrong)
    with pytest.raises(CheckpointError, match="image_encoder"):
        train3d(volume_config([f"data.path={spheres}", f"output={tmp_path / 'r'}",
                               f"backbone.checkpoint={wrong}"]))
    with pytest.raises(ConfigError, match="data.label=2 is not a class"):
        train3d(config(spheres, tmp_path / "r", "data.label=2"))
    with pytest.raises(ConfigError, match="train.iterations=0 is out of range"):
        config(spheres, tmp_path / "r", "train.iterations=0")
    bad = write_spheres(tmp_path / "bad", bad_label=True)
    with pytest.raises(InputError, match="not declared"):
        train3d(config(bad, tmp_path / "r"))
    pictures = tmp_path / "pictures"
    pictures.mkdir()
    write_disc_pictures(pictures, 4, (32, 32), 0, "disc{}", (10, 22, 10, 22), (4, 8))
    with pytest.raises(InputError, match="2D"):
        train3d(config(pictures, tmp_path / "r"))
    with pytest.raises(InputError, match="not a run folder of `samadapt train3d`"):
        predict3d(tmp_path, spheres, tmp_path / "p")
    assert not (tmp_path / "r").exists()  # nothing written before the checks passed


def test_patience_stops_a_run_that_no_longer_improves(spheres, tmp_path):
    result = train3d(config(spheres, tmp_path / "p", "train.steps=20", "train.val_every=1", "train.lr=1e-12",
                            "train.patience=1"))
    assert result.stopped_early and len(result.history) == 2  # the second validation is no better than the first
    assert RunDir(tmp_path / "p").manifest["training"]["stopped_early"]
