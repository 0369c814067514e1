"""Accuracy part of the benchmark: every method and baseline on the demo tasks, one budget, several seeds.

Each task is a ``samadapt compare`` run into ``OUT/accuracy/<task>`` (``<task>@<backbone>`` for a backbone other
than litemedsam; finished runs are reused, so an interrupted benchmark continues). Every method and baseline runs
on every task; a one-class method on the 3-class tissue task runs one-vs-rest (one head per class). The tissue
tasks are also scored, models unchanged, on the test slab under each simulated scanner shift
(``samadapt.data.shifts``). Test metrics are 3D per case and class.

Tasks: ``mni152-brain`` (a plumbing check: the template is skull-stripped, so brain extraction is a threshold),
``mni152-tissue`` (all 93 training slices), ``mni152-tissue-10`` (10 % of them, the few-label setting of H-SAM),
``nuclei``.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from ..evaluation.compare import ModelSpec, compare, summarize_rows
from ..data.demo_data import build_demo
from ..errors import ConfigError
from ..io_utils import atomic_write_json
from ..methods import METHODS
from .selection import preset


def model(label: str, method: str, *overrides: str, purpose: str = "cpu") -> str:
    """The compare spec ``LABEL=PRESET [overrides]``, PRESET being the preset ``method`` declares for ``purpose``."""
    return " ".join([f"{label}={preset(method, purpose)}", *overrides])


def with_variants(label: str, method: str, *overrides: str) -> tuple[str, ...]:
    """``model(label, method, *overrides)``, then the ablations ``method`` declares (each trained again:
    ``LABEL-NAME=PRESET ...``) and its re-scorings (the trained model's weights: ``LABEL-NAME=@LABEL ...``)."""
    cls = METHODS.get(method)
    return (model(label, method, *overrides),
            *(model(f"{label}-{name}", method, *overrides, *extra) for name, extra in cls.ablations.items()),
            *(" ".join([f"{label}-{name}=@{label}", *extra]) for name, extra in cls.rescorings.items()))


BINARY_MODELS = (model("decoder", "decoder"), model("unet", "unet"),
                 model("box-prompt-gt", "box-prompt", purpose="oracle"), model("box-prompt-whole", "box-prompt"),
                 model("desam-box", "desam", "method.options.mode=box"), *with_variants("hetersam", "hetersam"),
                 *with_variants("hsam", "hsam"), model("msam", "msam"), *with_variants("promise", "promise"))
# promise = the paper's APM_IPS_resnet; its other four variants are ``ProMISe.ablations`` (same CPU preset).
# DeSAM's grid mode decodes up to 81 point prompts per slice (about 14 s per slice on 2 CPU threads, 11 minutes per
# seed on the 46 test slices of the MNI152 slab), so it runs on the small nuclei task only.
DESAM_GRID = model("desam-grid", "desam")
# H-SAM's claim is against SAMed (same recipe: its CPU preset); its stages are re-scored from the same trained run
# (``HSAM.rescorings``); HeterSAM's fusion ablation is trained again (``HeterSAM.ablations``).
MULTICLASS_MODELS = (model("decoder", "decoder"), model("unet", "unet"),
                     model("box-prompt-gt", "box-prompt", purpose="oracle"), *with_variants("hsam", "hsam"),
                     model("samed", "samed"), model("desam-box", "desam", "method.options.mode=box"),
                     *with_variants("hetersam", "hetersam"), model("msam", "msam"),
                     *with_variants("promise", "promise"))
# The whole-image box cannot tell classes apart (it refuses 3 classes); the oracle box is the zero-shot row.
SHIFTS = tuple(f"mni152-tissue-{name}" for name in ("bias", "gamma", "gibbs", "blur", "lowres", "noise"))


@dataclass(frozen=True)
class Task:
    """A benchmark task: a demo dataset, the models trained on it, overrides for every model, the datasets its
    models are also scored on (unchanged) and how many times the convergence budget's epochs it gets (a task with
    a tenth of the slices has epochs a tenth as long)."""

    title: str
    models: tuple[str, ...]
    data: str
    common: tuple[str, ...] = ()
    targets: tuple[str, ...] = ()
    epoch_scale: int = 1


TASKS = {
    "mni152-brain": Task("MNI152 brain extraction (binary; test slab in 3D; a plumbing check)", BINARY_MODELS,
                         "mni152-brain"),
    "mni152-tissue": Task("MNI152 tissue (3 classes: 1 CSF/other, 2 grey matter, 3 white matter; all 93 training "
                          "slices)", MULTICLASS_MODELS, "mni152-tissue", targets=SHIFTS),
    "mni152-tissue-10": Task("MNI152 tissue, 10 % of the training slices (few labels)", MULTICLASS_MODELS,
                             "mni152-tissue", ("data.fewshot=0.1",), SHIFTS, epoch_scale=10),
    "nuclei": Task("Stardist nuclei tiles (binary; 4 test tiles of 128 x 128)", (*BINARY_MODELS, DESAM_GRID),
                   "nuclei"),
}


CONVERGE = {"patience": 5, "epochs": 100, "val_every_steps": 12}
"""The convergence budget of the published table: validate at most once per 12 optimizer steps (one epoch of the
full tissue task at batch 8), stop after 5 validations without a better validation Dice, at most 100 epochs (times
the task's ``epoch_scale``); the best-validation checkpoint is scored. The same rule for every model."""


def _spec(task: str, seeds: Sequence[int], minutes: float | None, epochs: int | None, patience: int | None,
          models: Sequence[str], backbone: str, val_every_steps: int | None) -> dict:
    return {"task": task, "seeds": list(seeds), "minutes": minutes, "epochs": epochs, "patience": patience,
            "val_every_steps": val_every_steps, "models": list(models), "backbone": backbone}


def _label(model_spec: str) -> str:
    return model_spec.partition("=")[0]


def select_models(task: str, models: tuple[str, ...], only: Sequence[str]) -> tuple[str, ...]:
    """The models of ``task`` that ``only`` names: a label keeps that model (a trained model brings its
    re-scorings, ``hsam`` brings ``hsam-stage1`` and ``hsam-stage2``; not its ablations, which train), ``-LABEL``
    leaves one out; with no plain label, every model but those left out. Unknown labels are an error."""
    keep = [o for o in only if not o.startswith("-")]
    drop = {o[1:] for o in only if o.startswith("-")}
    specs = [ModelSpec.parse(m) for m in models]
    labels = [s.label for s in specs]
    unknown = sorted((set(keep) | drop) - set(labels))
    if unknown:
        raise ConfigError(f"task {task!r} has no model(s) {unknown}; its models: {', '.join(labels)}")
    return tuple(m for m, s in zip(models, specs) if s.label not in drop
                 and (not keep or s.label in keep or s.reuses in keep))


def budget_text(spec: dict) -> str:
    """The training budget of a task's spec in words: wall minutes (labelled as such: they depend on the CPU)
    and/or epochs."""
    parts = ([f"{spec['minutes']:g} min wall-clock training per model (CPU-dependent)"]
             if spec.get("minutes") is not None else [])
    epochs, patience = spec.get("epochs"), spec.get("patience")
    if patience is not None:
        every = spec.get("val_every_steps")
        parts.insert(0, f"until validation Dice has not improved for {patience} validations (convergence"
                        + (f"; validation every epoch, at most once per {every} optimizer steps" if every else "")
                        + ")")
    parts += [f"at most {epochs} epoch{'s' if epochs != 1 else ''} per model"] if epochs is not None else []
    return ", ".join(parts) or "the presets' epochs"


def run_task(out: Path, task: str, seeds: Sequence[int], minutes: float | None = None, threads: int | None = None,
             models: Sequence[str] | None = None, epochs: int | None = None, patience: int | None = None,
             backbone: str = "litemedsam", val_every_steps: int | None = None, targets: bool = True,
             only: Sequence[str] = ()) -> dict:
    """Train and score one task (or reuse its finished result); returns the summary written to ``result.json``.

    ``minutes`` (wall clock), ``epochs``, ``patience`` and ``val_every_steps`` are the shared training budget (None
    keeps the presets'; ``CONVERGE`` is the convergence budget; ``epochs`` is multiplied by the task's
    ``epoch_scale``). ``backbone`` replaces every model's (``litemedsam``: the presets' own). ``targets=False``
    skips the shifted test sets; ``only`` chooses models by label (``select_models``). The summary holds the
    spec and, per model, test set and class, mean and std over cases and seeds of each metric.
    """
    if task not in TASKS:
        raise ConfigError(f"unknown benchmark task {task!r}; available: {', '.join(TASKS)}")
    spec_task = TASKS[task]
    models = select_models(task, tuple(models or spec_task.models), only)
    folder = out / "accuracy" / (task if backbone == "litemedsam" else f"{task}@{backbone}")
    epochs = epochs * spec_task.epoch_scale if epochs is not None else None
    spec = _spec(task, seeds, minutes, epochs, patience, models, backbone, val_every_steps)
    done = folder / "result.json"
    if done.exists():
        previous = json.loads(done.read_text())
        if previous["spec"] == spec:
            return previous
    data = build_demo(spec_task.data, folder / "data" / spec_task.data)
    common = [*spec_task.common, *([f"backbone.name={backbone}"] if backbone != "litemedsam" else []),
              *([f"train.val_every_steps={val_every_steps}"] if val_every_steps else [])]
    shifted = [(name, Path(build_demo(name, folder / "data" / name))) for name in spec_task.targets] if targets else []
    rows = compare(data, [ModelSpec.parse(m) for m in models], folder, minutes=minutes, epochs=epochs,
                   patience=patience, seeds=seeds, threads=threads, common=common, targets=shifted,
                   title=f"{spec_task.title}, {budget_text(spec)}, seeds {list(seeds)}", report="report")
    result = {"spec": spec, "title": spec_task.title + (f" [{backbone}]" if backbone != "litemedsam" else ""),
              "summary": summarize_rows(rows), "load_average": list(os.getloadavg())}
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
    """One task's table: Dice and HD95 (mean ± std over cases and seeds) with training and prediction time on the
    task's own test split; with shifted test sets, a second table of mean foreground Dice per test set."""
    spec = result["spec"]
    lines = [f"### {result['title']}", "",
             f"{budget_text(spec)}, seeds {spec['seeds']}; n = cases x seeds; train s: wall "
             "time of training including its last validation; epochs, steps (optimizer steps) and s to best (wall "
             "seconds to the best-validation epoch, whose checkpoint is scored): mean ± std over seeds."
             + _load_text(result.get("load_average")), "",
             "| model | class | n | Dice | HD95 mm | NSD 1 mm | epochs | steps | s to best | train s | "
             "predict s/slice |",
             "|" + "---|" * 11]
    source = [r for r in result["summary"] if r.get("test_set", "") in ("", "source")]
    for r in source:
        lines.append(f"| {r['model']} | {r['class']} | {r['n']} | {_cell(r, 'dice', 3)} | {_cell(r, 'hd95', 1)} | "
                     f"{_cell(r, 'nsd', 3)} | {_cell(r, 'epochs', 1)} | {_cell(r, 'steps', 0)} | "
                     f"{_cell(r, 's_to_best', 0)} | {r['train_s']:.0f} | {r['predict_s_per_slice']:.2f} |")
    return "\n".join(lines + _shift_table(result["summary"])) + "\n"


def _shift_table(summary: list[dict]) -> list[str]:
    """Mean foreground Dice (over classes of the per-class means) per model and test set, and each shifted set's
    change from the source test set; empty without shifted sets."""
    sets = list(dict.fromkeys(r.get("test_set", "") for r in summary))
    if len(sets) < 2:
        return []
    dice: dict[str, dict[str, float]] = {}
    for r in summary:
        dice.setdefault(r["model"], {}).setdefault(r.get("test_set", ""), []).append(r["dice"])
    lines = ["", "Mean foreground Dice on the test slab under each simulated scanner shift (models unchanged; in "
             "brackets the change from the source test slab):", "",
             "| model | " + " | ".join(sets) + " |", "|" + "---|" * (len(sets) + 1)]
    for model_name, per_set in dice.items():
        means = {k: float(np.nanmean(v)) if not all(math.isnan(x) for x in v) else math.nan
                 for k, v in per_set.items()}
        base = means.get(sets[0], math.nan)
        cells = [f"{means[k]:.3f}" + (f" ({means[k] - base:+.3f})" if k != sets[0] else "") if k in means else ""
                 for k in sets]
        lines.append(f"| {model_name} | " + " | ".join(cells) + " |")
    return lines
