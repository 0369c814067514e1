"""``samadapt train3d`` / ``predict3d`` in process (typer's runner) on tiny 40^3 sphere volumes with the tiny
SAM-Med3D: train, resume, predict (with clicks), and one-line errors with exit code 2 for bad input."""

from __future__ import annotations

import pytest
import torch
from typer.testing import CliRunner

from samadapt.cli import app
from samadapt.engine.rundir import RunDir
from synthetic import write_disc_pictures
from volumes3d import FAST, write_spheres

SETS = [a for s in FAST for a in ("--set", s)]


@pytest.fixture(autouse=True)
def restore_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def cli(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(app, [str(a) for a in args])
    return result.exit_code, result.output


def test_train_resume_and_predict_volumes(tmp_path):
    data, run = write_spheres(tmp_path / "Dataset001_Spheres"), tmp_path / "run"
    code, out = cli("train3d", data, "--out", run, "--tiny", "--steps", "2", *SETS)
    assert code == 0, out
    assert "best val Dice" in out and RunDir(run).best_checkpoint.is_file()
    code, out = cli("train3d", data, "--out", run, "--tiny", "--steps", "4", "--resume", "--allow-changes", *SETS)
    assert code == 0 and "resuming after step 2" in out, out
    assert [int(r["step"]) for r in RunDir(run).history()] == [2, 4]
    for extra in ([], ["--clicks", "2"]):
        code, out = cli("predict3d", data, "--run", run, "--out", tmp_path / "pred", *extra)
        assert code == 0 and "wrote 4 mask(s)" in out, out
    assert sorted(p.name for p in (tmp_path / "pred").iterdir()) == [f"c{i}.nii.gz" for i in range(4)] + \
        ["prediction.json"]


def test_bad_input_is_one_line_and_exit_code_2(tmp_path):
    data = write_spheres(tmp_path / "Dataset001_Spheres", n=2)
    pictures = tmp_path / "pictures"
    pictures.mkdir()
    write_disc_pictures(pictures, 3, (32, 32), 0, "disc{}", (10, 22, 10, 22), (4, 8))
    cases = [
        (["train3d", data, "--out", tmp_path / "r"], "--checkpoint"),
        (["train3d", data, "--out", tmp_path / "r", "--checkpoint", tmp_path / "none.pth"], "not found"),
        (["train3d", data, "--out", tmp_path / "r", "--tiny", "--checkpoint", tmp_path / "none.pth"], "takes no"),
        (["train3d", pictures, "--out", tmp_path / "r", "--tiny", *SETS], "is 2D"),
        (["train3d", data, "--out", tmp_path / "r", "--tiny", "--set", "data.label=3"], "data.label=3"),
        (["train3d", data, "--out", tmp_path / "r", "--tiny", "--set", "train.stepz=3"], "stepz"),
        (["predict3d", data, "--run", tmp_path, "--out", tmp_path / "p"], "not a run folder"),
    ]
    for args, message in cases:
        code, out = cli(*args)
        assert code == 2 and message in out and "Traceback" not in out, (args, out)
        assert len(out.strip().splitlines()) == 1, out
    assert not (tmp_path / "r").exists()
