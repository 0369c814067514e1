"""Accuracy part of the benchmark: every method and baseline on the demo tasks, one budget, several seeds.

Each task is a ``samadapt compare`` run into ``OUT/accuracy/<task>`` (finished runs are reused, so an interrupted
benchmark continues). The binary tasks train every method and baseline; the multi-class task (MNI152 tissue) the
models that handle several classes natively (``decoder``, ``unet``, ``hsam``) and the oracle-box baseline (the
one-class methods would run one-vs-rest: K heads, K times the cost). Test metrics are 3D per case and class.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from ..evaluation.compare import ModelSpec, compare, summarize_rows
from ..data.demo_data import build_demo
from ..errors import ConfigError
from ..io_utils import atomic_write_json
from .selection import preset


def model(label: str, method: str, *overrides: str, purpose: str = "cpu") -> str:
    """The compare spec ``LABEL=PRESET [overrides]``, PRESET being the preset ``method`` declares for ``purpose``."""
    return " ".join([f"{label}={preset(method, purpose)}", *overrides])


BINARY_MODELS = (model("decoder", "decoder"), model("unet", "unet"),
                 model("box-prompt-gt", "box-prompt", purpose="oracle"), model("box-prompt-whole", "box-prompt"),
                 model("desam-box", "desam", "method.options.mode=box"), model("hetersam", "hetersam"),
                 model("hsam", "hsam"), model("msam", "msam"), model("promise", "promise"),
                 model("promise-cross", "promise", "method.options.apm=cross"))
# promise = the paper's APM_IPS_resnet, promise-cross = APM_IPS_cross (cross-attention APM, same CPU preset).
# DeSAM's grid mode decodes up to 81 point prompts per slice (about 14 s per slice on 2 CPU threads, 11 minutes per
# seed on the 46 test slices of the MNI152 slab), so it runs on the small nuclei task only.
DESAM_GRID = model("desam-grid", "desam")
# H-SAM's claim is against SAMed (same recipe: its CPU preset); its stages are re-scored from the same trained run.
MULTICLASS_MODELS = (model("decoder", "decoder"), model("unet", "unet"),
                     model("box-prompt-gt", "box-prompt", purpose="oracle"), model("hsam", "hsam"),
                     "hsam-stage1=@hsam method.options.inference_stage=1",
                     "hsam-stage2=@hsam method.options.inference_stage=2", model("samed", "samed"))


@dataclass(frozen=True)
class Task:
    """A benchmark task: a demo dataset and the models trained on it."""

    title: str
    models: tuple[str, ...]


TASKS = {
    "mni152-brain": Task("MNI152 brain extraction (binary; test slab in 3D)", BINARY_MODELS),
    "mni152-tissue": Task("MNI152 tissue (3 classes: 1 CSF/other, 2 grey matter, 3 white matter)", MULTICLASS_MODELS),
    "nuclei": Task("Stardist nuclei tiles (binary; 4 test tiles of 128 x 128)", (*BINARY_MODELS, DESAM_GRID)),
}


CONVERGE = {"patience": 5, "epochs": 100}
"""The convergence budget of the published table: stop after 5 validations (one per epoch) without a better
validation Dice, at most 100 epochs; the best-validation checkpoint is scored. The same rule for every model."""


def _spec(task: str, seeds: Sequence[int], minutes: float | None, epochs: int | None, patience: int | None,
          models: Sequence[str]) -> dict:
    return {"task": task, "seeds": list(seeds), "minutes": minutes, "epochs": epochs, "patience": patience,
            "models": list(models)}


def budget_text(spec: dict) -> str:
    """The training budget of a task's spec in words: wall minutes (labelled as such: they depend on the CPU)
    and/or epochs."""
    parts = ([f"{spec['minutes']:g} min wall-clock training per model (CPU-dependent)"]
             if spec.get("minutes") is not None else [])
    epochs, patience = spec.get("epochs"), spec.get("patience")
    if patience is not None:
        parts.insert(0, f"until validation Dice has not improved for {patience} epochs (convergence)")
    parts += [f"at most {epochs} epoch{'s' if epochs != 1 else ''} per model"] if epochs is not None else []
    return ", ".join(parts) or "the presets' epochs"


def run_task(out: Path, task: str, seeds: Sequence[int], minutes: float | None = None, threads: int | None = None,
             models: Sequence[str] | None = None, epochs: int | None = None, patience: int | None = None) -> dict:
    """Train and score one task (or reuse its finished result); returns the summary written to ``result.json``.

    ``minutes`` (wall clock), ``epochs`` and ``patience`` are the shared training budget (None keeps the presets';
    ``CONVERGE`` is the convergence budget). The summary holds the spec and, per model and class, mean and std over
    cases and seeds of each metric.
    """
    if task not in TASKS:
        raise ConfigError(f"unknown benchmark task {task!r}; available: {', '.join(TASKS)}")
    models = tuple(models or TASKS[task].models)
    folder = out / "accuracy" / task
    spec = _spec(task, seeds, minutes, epochs, patience, models)
    done = folder / "result.json"
    if done.exists():
        previous = json.loads(done.read_text())
        if previous["spec"] == spec:
            return previous
    data = build_demo(task, folder / "data" / task)
    rows = compare(data, [ModelSpec.parse(m) for m in models], folder, minutes=minutes, epochs=epochs,
                   patience=patience, seeds=seeds,
                   threads=threads, title=f"{TASKS[task].title}, {budget_text(spec)}, seeds {list(seeds)}",
                   report="report")
    result = {"spec": spec, "title": TASKS[task].title, "summary": summarize_rows(rows),
              "load_average": list(os.getloadavg())}
    atomic_write_json(done, result)
    return result


def _cell(row: dict, key: str, digits: int) -> str:
    mean, std = row[key], row.get(f"{key}_std", 0.0)
    if mean is None or math.isnan(mean):
        return "n/a"
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def _load_text(load: list[float] | None) -> str:
    if not load:
        return ""
    return " Load average when the task finished (1/5/15 min): " + " / ".join(f"{x:.1f}" for x in load) + "."


def markdown(result: dict) -> str:
    """One task's table: Dice and HD95 (mean ± std over cases and seeds) with training and prediction time."""
    spec = result["spec"]
    lines = [f"### {result['title']}", "",
             f"{budget_text(spec)}, seeds {spec['seeds']}; n = cases x seeds; train s: wall "
             "time of training including its last validation; epochs, steps (optimizer steps) and s to best (wall "
             "seconds to the best-validation epoch, whose checkpoint is scored): mean ± std over seeds."
             + _load_text(result.get("load_average")), "",
             "| model | class | n | Dice | HD95 mm | NSD 1 mm | epochs | steps | s to best | train s | "
             "predict s/slice |",
             "|" + "---|" * 11]
    for r in result["summary"]:
        lines.append(f"| {r['model']} | {r['class']} | {r['n']} | {_cell(r, 'dice', 3)} | {_cell(r, 'hd95', 1)} | "
                     f"{_cell(r, 'nsd', 3)} | {_cell(r, 'epochs', 1)} | {_cell(r, 'steps', 0)} | "
                     f"{_cell(r, 's_to_best', 0)} | {r['train_s']:.0f} | {r['predict_s_per_slice']:.2f} |")
    return "\n".join(lines) + "\n"
