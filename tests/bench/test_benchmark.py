"""``samadapt benchmark``: every part runs end to end (tiny backbone, smallest sizes) into one RESULTS.md."""

from __future__ import annotations

import importlib.util
import json
import math
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from samadapt.bench import accuracy, latency, volume
from samadapt.bench.run import report, run_benchmark
from samadapt.errors import ConfigError

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TINY_MODELS = ("decoder=decoder_tiny train.batch_size=4", "box-prompt-whole=box_prompt_whole backbone.name=tiny")


def _numbers(text: str) -> list[float]:
    return [float(x) for x in re.findall(r"\| (\d+\.\d+) ", text)]


def test_latency_cost_volume_parts_from_the_command_line(tmp_path):
    out = tmp_path / "bench"
    proc = subprocess.run(
        [sys.executable, "-m", "samadapt.cli", "benchmark", "--out", str(out), "--parts", "latency,cost,volume",
         "--methods", "decoder", "--images", "1", "--batch", "2", "--threads", "1", "--no-profile", "--steps", "1",
         "--volume", "decoder:fast", "--volume", "decoder:int8:2", "--backbone", "tiny"],
        capture_output=True, encoding="utf-8", timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = (out / "RESULTS.md").read_text()
    assert "Missing parts: accuracy." in text
    lat = json.loads((out / "latency.json").read_text())
    variants = {(r["variant"], r["batch"]) for r in lat["rows"] if r["variant"] != "auto"}
    openvino = ("openvino",) if importlib.util.find_spec("openvino") else ()  # an optional package (setup installs it)
    assert variants == {(v, b) for v in ("plain", "fast", "fast-bf16", "onnx", "int8", *openvino) for b in (1, 2)}
    (auto,) = [r for r in lat["rows"] if r["variant"] == "auto"]  # what predict --fast chose, measured end to end
    assert auto["chosen"] == f"{auto['chosen'].split()[0]} b{auto['batch']}" and auto["batch"] in (1, 2)
    # fp32 rows agree with the plain masks up to rounding; bf16 and int8 move these untrained heads' probabilities,
    # which sit near 0.5, across the threshold on some pixels (their tolerances: test_fast_predict, test_export)
    lossy = ("int8", "fast-bf16", "openvino", "auto")
    assert all(r["s"] > 0 and r["agree"] > (0.5 if r["variant"] in lossy else 0.99) for r in lat["rows"])
    assert isinstance(lat["bf16_native"], bool)
    assert lat["stock"] > 0
    cost = json.loads((out / "cost.json").read_text())["rows"][0]
    assert cost["method"] == "decoder" and cost["step_s_no_cache"] > 0 and cost["step_s_cache"] > 0
    assert cost["train_rss_cache"] > 100 and cost["predict_rss"] > 100  # MiB: a whole torch process
    vol = json.loads((out / "volume.json").read_text())
    cases = list(volume.write_volumes(out / "volume"))  # the MNI152 T1, and the CT where its package is installed
    assert [(r["variant"], r["batch"], r["case"]) for r in vol["rows"]] == \
        [(v, b, c) for v, b in (("fast", 8), ("int8", 2)) for c in cases]
    assert all(r["slices"] == r["shape"][0] and r["seconds"] > 0 and not r["trained"] for r in vol["rows"])
    assert (out / "volume" / "decoder-int8-b2" / "mni152_t1.nii.gz").exists()
    for heading in ("Prediction latency", "Training cost", "3D: seconds per volume"):
        assert heading in text
    assert "samadapt benchmark --out" in text  # the command that produced the numbers is in the report
    assert len(_numbers(text)) > 10
    (out / "RESULTS.md").unlink()  # --parts '': the report again from the stored results, nothing measured
    again = subprocess.run([sys.executable, "-m", "samadapt.cli", "benchmark", "--out", str(out), "--parts", "",
                            "--results", str(tmp_path / "R.md")], capture_output=True, encoding="utf-8", timeout=120)
    assert again.returncode == 0, again.stderr[-2000:]
    assert (tmp_path / "R.md").read_text() == text


def test_mask_agreement_counts_equal_pixels_and_foreground_dice(tmp_path):
    from PIL import Image

    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    x = np.zeros((4, 5), np.uint8)
    x[0, :4] = 1  # class 1: 4 pixels; class 2: 2 pixels
    x[3, :2] = 2
    y = x.copy()
    y[0, 0] = 0  # class 1: 3 of 4 kept -> Dice 6 / 7; class 2 unchanged -> 1.0
    Image.fromarray(x).save(a / "p.png")
    Image.fromarray(y).save(b / "p.png")
    agree, dice = latency.agreement(a, b)
    assert agree == pytest.approx(19 / 20) and dice == pytest.approx((6 / 7 + 1.0) / 2)
    Image.fromarray(np.zeros((4, 5), np.uint8)).save(a / "p.png")
    Image.fromarray(np.zeros((4, 5), np.uint8)).save(b / "p.png")
    assert latency.agreement(a, b) == (1.0, 1.0)  # no foreground anywhere: nothing disagrees


def test_latency_times_the_trained_run_of_each_method(tmp_path):
    """``--trained``: a method's own-named run is preferred to its longer-labelled variants; every row of it is
    timed on the trained weights (the fp32 rows give its exact masks) and says so."""
    tiny = "decoder_tiny train.batch_size=4"
    accuracy.run_task(tmp_path, "nuclei", seeds=[0], epochs=2, patience=1, targets=False,
                      models=(f"decoder-long={tiny}", f"decoder={tiny}", "box-prompt-whole=box_prompt_whole "
                              "backbone.name=tiny"))
    runs_folder = tmp_path / "accuracy" / "nuclei" / "runs"
    assert latency.trained_runs(runs_folder) == {"decoder": runs_folder / "decoder" / "seed0"}
    assert latency.trained_runs(runs_folder / "decoder-long") == {"decoder": runs_folder / "decoder-long" / "seed0"}
    assert latency.trained_runs(None) == {}
    pictures = tmp_path / "pictures"
    latency.write_pictures(pictures, 2)
    rows = latency.run_method("decoder", pictures, tmp_path / "work", 2, 1, "tiny", runs_folder / "decoder" / "seed0")
    assert {r["head"] for r in rows} == {"trained (decoder, seed0)"}
    fp32 = [r for r in rows if r["variant"] in ("plain", "fast", "onnx")]
    assert len(fp32) == 6 and all(r["agree"] > 0.999 and r["dice"] > 0.99 for r in fp32)
    # where the time went: the encoder (hooked, or the ONNX session) inside the model, the rest around it
    assert all(0 < r["stages"]["encoder"] and r["stages"]["head"] >= 0 and r["stages"]["io"] > 0 and
               sum(r["stages"].values()) == pytest.approx(r["s"]) for r in rows)
    table = latency.markdown({"backbone": "tiny", "images": 2, "batch": 2, "threads": 1, "stock": 1.0,
                              "stock_start": 1.0, "stock_end": 1.0, "stock_rss": 1.0, "rows": rows,
                              "trained": str(runs_folder), "bf16_native": False})
    assert "| decoder | trained (decoder, seed0) | plain | 1 |" in table and str(runs_folder) in table
    assert "| decoder | " + rows[-1]["chosen"] + " | " in table  # the chosen path's stage row


def test_a_refused_export_is_a_row_not_the_end_of_the_benchmark(tmp_path, monkeypatch):
    """M-SAM's int8 encoder once failed its own export check and stopped the whole latency part: now that variant
    is a ``refused`` row with the reason, and every other row (auto included) is still measured."""
    select = latency.select

    def refuse_int8(exact, path, *args):
        if path == "int8":
            raise ConfigError("the int8 encoder moves probabilities by 0.157 on average on the check input (> 0.1)")
        return select(exact, path, *args)

    monkeypatch.setattr(latency, "select", refuse_int8)
    pictures = tmp_path / "pictures"
    latency.write_pictures(pictures, 1)
    rows = latency.run_method("decoder", pictures, tmp_path / "work", 2, 1, "tiny")
    refused = [r for r in rows if "refused" in r]
    assert [(r["variant"], r["batch"]) for r in refused] == [("int8", 1), ("int8", 2)]
    assert "0.157" in refused[0]["refused"]
    openvino = {"openvino"} if importlib.util.find_spec("openvino") else set()
    assert {r["variant"] for r in rows if "s" in r} == {"plain", "fast", "fast-bf16", "onnx", "auto", *openvino}
    table = latency.markdown({"backbone": "tiny", "images": 1, "batch": 2, "threads": 1, "stock": 1.0,
                              "stock_start": 1.0, "stock_end": 1.0, "stock_rss": 1.0, "rows": rows,
                              "trained": None, "bf16_native": False})
    assert "| decoder | untrained | int8 | 1 | refused: the int8 encoder moves probabilities" in table


def test_accuracy_part_scores_seeds_and_reuses_its_result(tmp_path, monkeypatch):
    result = accuracy.run_task(tmp_path, "nuclei", seeds=[0, 1], epochs=3, patience=1, models=TINY_MODELS)
    rows = {r["model"]: r for r in result["summary"]}
    dec = rows["decoder"]  # the convergence budget: stopped by patience or at 3 epochs, best epoch among them
    assert 1 <= dec["best_epoch"] <= dec["epochs"] <= 3 and dec["steps"] >= dec["epochs"] and dec["s_to_best"] > 0
    assert math.isnan(rows["box-prompt-whole"]["epochs"])  # zero-shot: nothing trained
    assert set(rows) == {"decoder", "box-prompt-whole"}
    assert rows["decoder"]["n"] == 4 * 2  # 4 test tiles x 2 seeds
    assert 0.0 <= rows["decoder"]["dice"] <= 1.0 and rows["decoder"]["dice_std"] >= 0.0
    assert (tmp_path / "accuracy" / "nuclei" / "runs" / "decoder" / "seed1" / "checkpoints").is_dir()
    table = accuracy.markdown(result)
    assert "| decoder | 1 | 8 |" in table and " ± " in table and "not improved for 1 validations (convergence), at most 3 epochs" in table

    def no_training(*args, **kwargs):
        raise AssertionError("a finished task with the same settings must not run again")

    monkeypatch.setattr(accuracy, "compare", no_training)
    reused = accuracy.run_task(tmp_path, "nuclei", seeds=[0, 1], epochs=3, patience=1, models=TINY_MODELS)
    assert json.dumps(reused) == json.dumps(result)  # (as text: NaN metrics are not equal to themselves)
    with pytest.raises(AssertionError):  # other settings: runs again
        accuracy.run_task(tmp_path, "nuclei", seeds=[0], epochs=1, models=TINY_MODELS)


def test_few_label_task_scores_shifted_targets_on_another_backbone(tmp_path, monkeypatch):
    """The 10 % tissue task: its models see a tenth of the slices with 10x the epoch cap, are scored unchanged on a
    shifted test slab (one shift here), and run on the backbone asked for (folder and title say which)."""
    import dataclasses

    task = dataclasses.replace(accuracy.TASKS["mni152-tissue-10"], targets=("mni152-tissue-gamma",))
    monkeypatch.setitem(accuracy.TASKS, "mni152-tissue-10", task)
    result = accuracy.run_task(tmp_path, "mni152-tissue-10", seeds=[0], epochs=1, patience=1, backbone="tiny",
                               val_every_steps=4, only=["decoder"],
                               models=("decoder=decoder_tiny train.batch_size=4", "unet=unet_cpu"))
    assert result["spec"]["epochs"] == 10 and result["spec"]["backbone"] == "tiny"
    assert result["title"].endswith("[tiny]")
    run = tmp_path / "accuracy" / "mni152-tissue-10@tiny" / "runs" / "decoder" / "seed0"
    config = (run / "config.yaml").read_text()
    assert "fewshot: 0.1" in config and "val_every_steps: 4" in config
    assert {r["test_set"] for r in result["summary"]} == {"source", "mni152-tissue-gamma"}
    assert {r["class"] for r in result["summary"]} == {1, 2, 3}
    table = accuracy.markdown(result)
    assert "| model | source | mni152-tissue-gamma |" in table and "validation every epoch, at most once per 4" in table
    assert re.search(r"\| decoder \| \d\.\d{3} \| \d\.\d{3} \([+-]\d\.\d{3}\) \|", table), table


def test_report_lists_missing_parts_and_rejects_unknown_ones(tmp_path):
    assert "Missing parts: accuracy, latency, cost, volume." in report(tmp_path)
    with pytest.raises(ConfigError, match="unknown benchmark part"):
        run_benchmark(tmp_path, ["speed"])
    for bad in ("decoder", "decoder:slow", "decoder:fast:0", "nope:fast", "decoder:fast:2:x"):
        with pytest.raises(ConfigError, match="METHOD:VARIANT"):
            volume.parse_run(bad)
    assert volume.parse_run("unet:int8:3") == ("unet", "int8", 3)
    with pytest.raises(ConfigError, match="unknown benchmark task"):
        accuracy.run_task(tmp_path, "liver", seeds=[0], minutes=1)
    with pytest.raises(ConfigError, match=r"no model\(s\) \['nope'\]"):
        accuracy.run_task(tmp_path, "mni152-tissue", seeds=[0], minutes=1, only=["unet", "nope"])
    with pytest.raises(ConfigError, match=r"no model\(s\) \['hsam-stage3'\]"):
        accuracy.run_task(tmp_path, "mni152-tissue", seeds=[0], minutes=1, only=["-hsam-stage3"])
    assert not list(Path(tmp_path).iterdir())  # nothing written for a rejected request


def test_models_are_chosen_by_label_with_their_rescorings_unless_left_out():
    models = accuracy.TASKS["mni152-tissue"].models

    def labels(only):
        return [accuracy._label(m) for m in accuracy.select_models("t", models, only)]

    assert labels(["hsam", "unet"]) == ["unet", "hsam", "hsam-stage1", "hsam-stage2"]
    assert labels(["hsam", "-hsam-stage1", "-hsam-stage2"]) == ["hsam"]
    assert labels(["hetersam"]) == ["hetersam"]  # its fusion ablation trains: named on its own
    assert labels(["hetersam-fusion-none"]) == ["hetersam-fusion-none"]
    assert labels(["-hsam-stage1", "-hsam-stage2"]) == [x for x in labels([]) if "-stage" not in x]
    assert labels([]) == [accuracy._label(m) for m in models]


def test_cost_of_a_method_without_cache_is_not_applicable(tmp_path, mni152_brain_dataset):
    from samadapt.bench import cost

    row = cost.train_step("unet", mni152_brain_dataset, tmp_path, cache=True, steps=1, backbone="tiny")
    assert row["step_s"] is None and row["rss"] is None
    text = cost.markdown({"backbone": "tiny", "steps": 1, "threads": 1, "rows": [
        {"method": "unet", "batch": 4, "step_s_no_cache": 1.0, "step_s_cache": None, "train_rss_no_cache": 900.0,
         "train_rss_cache": None, "predict_s_per_slice": 0.1, "predict_rss": 800.0}]})
    assert "| unet | 4 | 1.00 | n/a | n/a | 900 / n/a | 0.10 | 800 |" in text


def test_cost_reports_each_training_speed_default_against_its_absence(tmp_path, mni152_brain_dataset):
    from samadapt.bench import cost
    import torch

    from samadapt.engine.fast import resolve_amp

    cpu = torch.device("cpu")
    row = cost.train_step("unet", mni152_brain_dataset, tmp_path, cache=True, steps=1, backbone="tiny")
    assert row["amp"] == resolve_amp("auto", cpu)  # the default: bf16 where this CPU computes it natively
    off = cost.train_step("unet", mni152_brain_dataset, tmp_path, cache=True, steps=1, backbone="tiny",
                          overrides=[cost.SPEED_CHANGES["bf16"]])
    assert off["amp"] == "none"
    text = cost.markdown({"backbone": "tiny", "steps": 1, "threads": 1, "rows": [
        {"method": "decoder", "batch": 8, "step_s_no_cache": 4.0, "step_s_cache": 2.0, "train_rss_no_cache": 900.0,
         "train_rss_cache": 700.0, "predict_s_per_slice": 0.1, "predict_rss": 800.0, "amp": "bf16",
         "step_s_without_bf16": 2.5, "step_s_without_reuse_memory": 4.0}]})
    assert "| decoder | bf16 | 2.00 | 2.50 | 0.80 | 4.00 | 0.50 |" in text


def test_the_report_says_other_work_shared_the_cpu_only_when_the_load_says_so():
    """The benchmark's own threads make a load of about the core count; only more than that means other work."""
    from samadapt.bench.run import _load_text

    assert "no sign of other work" in _load_text([2.1, 2.0, 1.7], 2)
    assert "other work shared the CPU" in _load_text([4.9, 4.1, 3.0], 2)
