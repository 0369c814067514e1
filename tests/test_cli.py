"""End-to-end through the command line: train (1 and 2 processes), predict, evaluate, bad input."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from synthetic import write_disc_pictures
from support import ENV, run_cli





@pytest.fixture(scope="module")
def disc_folder(tmp_path_factory) -> Path:
    """A 2D images/ + masks/ dataset of 12 gray 80x96 pictures with one bright disc each ({0,255} masks)."""
    return write_disc_pictures(tmp_path_factory.mktemp("discs"), 12, (80, 96), 0, "case{:02d}", (25, 55, 25, 70), (8, 18))


TINY = ["--backbone", "tiny", "--method", "decoder", "--device", "cpu", "--set", "data.cache=off",
        "--set", "data.empty_ratio=null", "--set", "train.batch_size=4", "--set", "train.lr=0.001"]


def test_train_predict_evaluate_round_trip(disc_folder, tmp_path):
    out = tmp_path / "run"
    run_cli("train", "--data", str(disc_folder), "--out", str(out), "--epochs", "3", *TINY)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["backbone"]["name"] == "tiny" and manifest["training"]["epochs_run"] == 3
    assert set(manifest["data"]["split"]) >= {"train", "val", "test"}
    pred = tmp_path / "pred"
    run_cli("predict", str(disc_folder / "images"), "--run", str(out), "--out", str(pred), "--device", "cpu")
    written = sorted(p.name for p in pred.iterdir() if p.name != "prediction.json")  # + how they were computed
    assert written == sorted(p.name for p in (disc_folder / "images").iterdir())
    assert json.loads((pred / "prediction.json").read_text())["prediction"]["fast"] is None  # the exact path
    for name in written:  # each mask has its image's size
        assert Image.open(pred / name).size == Image.open(disc_folder / "images" / name).size
    ev = tmp_path / "eval"
    run_cli("evaluate", str(pred), str(disc_folder / "masks"), "--out", str(ev))
    summary = json.loads((ev / "summary.json").read_text())
    assert (ev / "per_case.csv").is_file() and summary


def test_two_process_ddp_training(disc_folder, tmp_path):
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "samadapt.cli", "train", "--data", str(disc_folder), "--out", str(out), "--epochs", "2", *TINY]
    proc = subprocess.run(cmd, capture_output=True, text=True, encoding="utf-8", env=ENV, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["world_size"] == 2
    ckpts = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert ckpts == ["best.json", "best.safetensors", "last.json", "last.safetensors"]
    rows = (out / "log.csv").read_text().strip().splitlines()
    assert len(rows) == 3  # header + 2 epochs, written once (rank 0 only)


def test_bad_input_errors(disc_folder, tmp_path):
    bad = run_cli("train", "--data", str(tmp_path / "nope"), "--out", str(tmp_path / "r"), *TINY, check=False)
    assert bad.returncode == 2 and "nope" in bad.stderr
    bad = run_cli("train", "--data", str(disc_folder), "--method", "no-such-method", "--out", str(tmp_path / "r2"),
              check=False)
    assert bad.returncode == 2 and "unknown method 'no-such-method'" in bad.stderr
    bad = run_cli("train", "--data", str(disc_folder), "--backbone", "nope", "--out", str(tmp_path / "r3"), check=False)
    assert bad.returncode == 2 and "unknown backbone 'nope'" in bad.stderr
    bad = run_cli("train", "--data", str(disc_folder), "--set", "train.nosuchkey=1", check=False)
    assert bad.returncode == 2 and "train.nosuchkey" in bad.stderr
    # a checkpoint trained on another backbone is refused
    out = tmp_path / "run"
    run_cli("train", "--data", str(disc_folder), "--out", str(out), "--epochs", "1", *TINY)
    manifest_path = out / "checkpoints" / "best.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["backbone"]["weights_id"] = "0123456789abcdef"
    manifest_path.write_text(json.dumps(manifest))
    bad = run_cli("predict", str(disc_folder / "images"), "--checkpoint", str(out / "checkpoints" / "best.safetensors"),
              "--out", str(tmp_path / "p"), check=False)
    assert bad.returncode == 2 and "trained on backbone tiny" in bad.stderr
    assert not (tmp_path / "p").exists() or not any((tmp_path / "p").iterdir())


def test_info_lists_methods_and_backbones():
    out = run_cli("info").stdout
    for name in ("decoder", "box-prompt", "unet", "litemedsam", "tiny", "sam_vit_b"):
        assert name in out
    from samadapt.engine.device import cpu_capabilities

    cpu = cpu_capabilities()  # what info says of the CPU and of --fast follows the CPU it runs on
    flat = " ".join(out.split())  # rich wraps lines at the terminal's width, which depends on the CPU's flag list
    assert f"native bf16: {'yes' if cpu['bf16_native'] else 'no'}" in flat
    assert ("bf16 autocast" if cpu["bf16_native"] else "fp32 (no native bf16") in flat
    from samadapt.engine.openvino_session import openvino_available
    from samadapt.engine.path_choice import auto_paths

    assert f"predict --fast times here: exact, {', '.join(auto_paths(torch.device('cpu')))} " in flat
    assert f"openvino {'installed' if openvino_available() else 'not installed'}" in flat
    assert "litemedsam (boxes)" in flat and "mobilesam (points/boxes/masks)" in flat


def test_compare_trains_reuses_and_reports(disc_folder, tmp_path):
    out = tmp_path / "cmp"
    args = ["compare", str(disc_folder), "--out", str(out), "--seeds", "0,1", "--epochs", "2",
            "--set", "data.cache=off", "--set", "data.empty_ratio=null",
            "-m", "dec=decoder_tiny", "-m", "dec_again=@dec", "-m", "box=box_prompt_whole backbone.name=tiny"]
    first = run_cli(*args)
    rows = json.loads((out / "report" / "metrics.json").read_text())
    test_cases = json.loads((out / "runs" / "dec" / "seed0" / "manifest.json").read_text())["data"]["split"]["test"]
    assert len(rows) == 3 * 2 * len(test_cases)  # models x seeds x cases, one foreground class
    for model in ("dec", "dec_again", "box"):
        assert {r["seed"] for r in rows if r["model"] == model} == {0, 1}
    by = {(r["model"], r["seed"], r["case"]): r["dice"] for r in rows}
    for (model, seed, case), dice in by.items():  # the re-evaluation of an unchanged run scores the same
        if model == "dec":
            assert by[("dec_again", seed, case)] == pytest.approx(dice)
    readme = (out / "report" / "README.md").read_text()
    assert "| dec | 1 |" in readme and (out / "report" / "overlays.png").stat().st_size > 0
    assert (out / "report" / "training_curves.png").is_file() and "reusing" not in first.stderr
    second = run_cli(*args)  # finished runs are reused, not trained again
    assert second.stderr.count("reusing the finished run") == 2
    again = json.loads((out / "report" / "metrics.json").read_text())
    assert [(r["model"], r["dice"]) for r in again] == [(r["model"], r["dice"]) for r in rows]


def test_compare_rejects_a_reuse_of_an_unknown_model(disc_folder, tmp_path):
    proc = run_cli("compare", str(disc_folder), "--out", str(tmp_path / "c"), "-m", "a=@nothing", check=False)
    assert proc.returncode == 2 and "nothing" in proc.stderr
