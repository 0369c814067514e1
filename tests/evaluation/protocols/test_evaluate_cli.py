"""``samadapt evaluate <protocol>``: every subcommand's help, the old forms kept as aliases, a real folders run in the
new and the old form, and a bad protocol argument reported on one line."""

from __future__ import annotations

import json
import shutil

import pytest
from typer.testing import CliRunner

from samadapt.cli import app
from support import run_cli
from synthetic import write_disc_pictures

SUBCOMMANDS = ("folders", "dg", "refinement", "prompting", "light-decoder")


@pytest.mark.parametrize("args", [["evaluate"], *[["evaluate", s] for s in SUBCOMMANDS], ["evaluate-dg"]],
                         ids=lambda a: " ".join(a))
def test_every_evaluate_help_works(args):
    result = CliRunner().invoke(app, [*args, "--help"])
    assert result.exit_code == 0, result.output
    if args == ["evaluate"]:
        assert all(s in result.output for s in SUBCOMMANDS)
    else:
        assert "--out" in result.output


def test_folders_in_the_new_and_the_old_form(tmp_path):
    (tmp_path / "gt").mkdir()
    gt = write_disc_pictures(tmp_path / "gt", 3, (32, 32), seed=0, name="c{}", centre=(10, 22, 10, 22),
                             radius=(4, 8))
    pred = tmp_path / "pred"
    shutil.copytree(gt / "masks", pred)
    for args in (["evaluate", "folders", str(pred), str(gt / "masks"), "--out", str(tmp_path / "new")],
                 ["evaluate", str(pred), str(gt / "masks"), "--out", str(tmp_path / "old")],
                 ["evaluate", "--out", str(tmp_path / "first"), str(pred), str(gt / "masks")]):
        result = CliRunner().invoke(app, args)
        assert result.exit_code == 0, result.output
    for name in ("new", "old", "first"):
        summary = json.loads((tmp_path / name / "summary.json").read_text())
        assert summary["foreground"]["dice"]["mean"] == 1.0  # the prediction is the ground truth


def test_a_bad_run_item_is_one_line(tmp_path):
    proc = run_cli("evaluate", "light-decoder", "--run", str(tmp_path), "--out", str(tmp_path / "o"), check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [f"error: --run '{tmp_path}': expected NAME=RUN_DIR"]
    assert not (tmp_path / "o").exists()
