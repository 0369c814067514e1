"""Train several models on one dataset with the same budget and compare them on its test split, in one report.

A model is given as ``LABEL=CONFIG [key=value ...]``: a preset name (``samadapt/config/presets``) or YAML file plus dotted
overrides, e.g. ``desam_box=desam_cpu method.options.mode=box``. ``LABEL=@OTHER [key=value ...]`` evaluates the
trained run ``OTHER`` again with changed options and no training, e.g. ``promise_gt=@promise
method.options.eval_points=gt`` or ``hsam_stage1=@hsam method.options.inference_stage=1``.

Every run of ``OUT/runs/LABEL/seedN`` that already finished is reused, so an interrupted comparison continues where
it stopped (delete a run's folder to train it again), and so is every score of a model on a test case
(``OUT/scores``, :mod:`samadapt.evaluation.score_store`): each model is scored right after its training, and
comparisons of disjoint model subsets run in parallel into one ``OUT`` are combined by a run over all of them. Test metrics are 3D per case and foreground class (Dice, IoU,
HD95/NSD/ASSD in mm); the summary gives mean and standard deviation over cases and seeds.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

from ..config.run_config import RunConfig, load_config
from ..engine.predict import Predictor
from ..engine.run import open_source
from ..engine.run import train as run_train
from ..engine.rundir import RunDir
from ..data.slices import collate, volume_slices
from ..errors import ConfigError
from ..io_utils import atomic_write_text
from .metrics import compute_metrics
from .report import METRIC_ORDER, plot_overlays, plot_training_curves, write_metrics
from .score_store import ScoreStore, case_key, model_fingerprint

console = Console(stderr=True)


@dataclass
class ModelSpec:
    """One model of a comparison: a config (preset, file, or ``@label`` of a trained model) plus overrides."""

    label: str
    config: str
    overrides: list[str] = field(default_factory=list)

    @property
    def reuses(self) -> str | None:
        """The label of the trained model this one re-evaluates, if any."""
        return self.config[1:] if self.config.startswith("@") else None

    @classmethod
    def parse(cls, text: str) -> "ModelSpec":
        """``"LABEL=CONFIG key=value ..."`` -> ModelSpec."""
        head, *overrides = text.split()
        label, sep, config = head.partition("=")
        if not sep or not label or not config:
            raise ConfigError(f"model {text!r} must look like LABEL=PRESET [key=value ...] or LABEL=@OTHER [...]")
        return cls(label, config, overrides)


@dataclass
class Trained:
    """A model ready for prediction, with what training it took."""

    predictor: Predictor
    history: list[dict]
    train_seconds: float
    fingerprint: str
    """What its predictions depend on (:func:`samadapt.evaluation.score_store.model_fingerprint`)."""

    def convergence(self) -> dict[str, float]:
        """Epochs and optimizer steps trained, the best (checkpointed) epoch and the wall seconds to reach it;
        NaN for models that were not trained."""
        if not self.history:
            return {k: math.nan for k in CONVERGENCE_KEYS}
        scored = [r for r in self.history if not math.isnan(r.get("val_dice", math.nan))]
        best = max(scored, key=lambda r: r["val_dice"]) if scored else self.history[-1]  # first of equal bests
        return {"epochs": float(self.history[-1]["epoch"]), "steps": float(self.history[-1].get("steps", math.nan)),
                "best_epoch": float(best["epoch"]), "s_to_best": float(best["seconds"])}


CONVERGENCE_KEYS = ("epochs", "steps", "best_epoch", "s_to_best")
CONSOLE_KEYS = ("dice", "hd95", "nsd", "epochs", "s_to_best", "train_s")
"""The columns of the table printed at the end of a comparison (a terminal is narrow)."""
"""Per-model training facts in every comparison row and summary (mean ± std over seeds)."""


def _train_or_reuse(cfg: RunConfig, num_classes: int) -> Trained:
    run = RunDir(cfg.output)
    if run.is_trained():
        console.print(f"reusing the finished run {run.path}")
        history = run.history()
    else:
        result = run_train(cfg, resume=run.state.exists())  # an interrupted run continues
        if result is None:  # zero-shot: nothing to train
            return Trained(Predictor.from_config(cfg, num_classes, device="cpu", use_cache=True), [], 0.0,
                           model_fingerprint(None, cfg.to_dict()))
        history = result.history
    predictor = Predictor.from_checkpoint(run.best_checkpoint, device="cpu", use_cache=True)
    return Trained(predictor, history, history[-1]["seconds"] if history else 0.0,
                   model_fingerprint(run.best_checkpoint))


def _evaluate_stored(store: ScoreStore, trained: Trained, overrides: Sequence[str], test_set: str, case,
                     classes: list[int]) -> tuple[np.ndarray, list[dict], float]:
    """:func:`_evaluate`, or the stored result of the same model on the same case."""
    key = case_key(trained.fingerprint, overrides, METRIC_ORDER, test_set, case)
    stored = store.get(key)
    if stored is not None:
        return stored
    result = _evaluate(trained.predictor, case, classes)
    store.put(key, *result)
    return result


def _evaluate(predictor: Predictor, case, classes: list[int]) -> tuple[np.ndarray, list[dict], float]:
    t = time.perf_counter()
    pred = predictor.predict_case(case)
    seconds = time.perf_counter() - t
    scores = compute_metrics(pred, case.label, classes=classes, spacing=case.spacing, metrics=METRIC_ORDER)
    return pred, [{"class": c, **{m: scores[c][m] for m in METRIC_ORDER}} for c in classes], seconds


def summarize_rows(rows: Sequence[dict]) -> list[dict]:
    """Mean and std of each metric over cases and seeds, per model, named test set (``test_set``, "" when the
    dataset has none) and class (NaNs left out and counted)."""
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault((row["model"], row.get("test_set", ""), row["class"]), []).append(row)
    out = []
    for (model, test_set, cls), items in groups.items():
        summary = {"model": model, "test_set": test_set, "class": cls, "n": len(items)}
        for key in (*METRIC_ORDER, "train_s", *CONVERGENCE_KEYS, "predict_s_per_slice"):
            values = np.array([r.get(key, math.nan) for r in items], dtype=float)
            valid = values[~np.isnan(values)]
            summary[key] = float(valid.mean()) if len(valid) else math.nan
            summary[f"{key}_std"] = float(valid.std()) if len(valid) > 1 else 0.0
        out.append(summary)
    return out


def _cell(row: dict, key: str) -> str:
    mean, std = row[key], row.get(f"{key}_std", 0.0)
    if math.isnan(mean):
        return "n/a"
    digits = {"steps": 0, "s_to_best": 0, "train_s": 0, "epochs": 1, "best_epoch": 1}.get(key, 3)
    return f"{mean:.{digits}f} ± {std:.{digits}f}" if std else f"{mean:.{digits}f}"


def compare(data: str | Path, models: Sequence[ModelSpec], out: str | Path, *, minutes: float | None = None,
            epochs: int | None = None, patience: int | None = None, seeds: Sequence[int] = (0,),
            threads: int | None = None, common: Sequence[str] = (), targets: Sequence[tuple[str, Path]] = (),
            title: str = "comparison", overlays: bool = True, report: str = "report") -> list[dict]:
    """Train (or reuse) each model for each seed, evaluate all on the test split; write ``OUT/<report>``.

    Args:
        data: dataset folder (any reader), the same for every model.
        minutes, epochs, patience: the shared training budget (``train.max_minutes`` / ``train.epochs`` /
            ``train.patience``); None keeps the presets'. The convergence budget is ``patience`` (stop after that
            many validations without improvement) with ``epochs`` as the most; wall minutes depend on the CPU.
        common: overrides applied to every model before its own.
        targets: ``(name, dataset folder)`` pairs whose test splits are scored too, unchanged models (e.g. the
            source under a simulated scanner shift); their rows carry ``test_set = name``.
        report: name of the report folder inside ``out`` (several comparisons can share runs and cache).

    Returns:
        The per-case rows: model, seed, case, class, metrics, train_s, predict_s_per_slice.
    """
    out = Path(out)
    if threads:
        torch.set_num_threads(threads)
    labels = [m.label for m in models]
    if len(set(labels)) != len(labels):
        raise ConfigError(f"model labels must be unique, got {labels}")
    for m in models:
        if m.reuses is not None and m.reuses not in labels:
            raise ConfigError(f"model {m.label!r} re-evaluates {m.reuses!r}, which is not in the comparison")
    base = [f"data.path={data}", f"data.cache_dir={out / 'cache'}", "train.device=cpu", *common]
    budget = ([f"train.max_minutes={minutes}"] if minutes is not None else []) + \
        ([f"train.epochs={epochs}"] if epochs is not None else []) + \
        ([f"train.patience={patience}"] if patience is not None else [])
    source = open_source(load_config(None, base).data)
    classes = list(range(1, source.num_classes + 1))
    named = {cid: name for name, ids in source.test_sets.items() for cid in ids}  # PraNet's five sets, ...
    test_cases = [(named.get(case_id, ""), source.load(case_id)) for case_id in source.make_split().test]
    if not test_cases:
        raise ConfigError(f"{data}: the split has no test cases to compare on")
    test_cases += _target_cases(targets, base, source.num_classes)
    named_sets = bool(named or targets)

    rows: list[dict] = []
    histories: dict[str, list] = {}
    shown: dict[str, np.ndarray] = {}
    plotters: dict[str, Predictor] = {}
    t0 = time.time()
    for seed in seeds:
        trained: dict[str, Trained] = {}
        # models that re-evaluate a trained one come after all trained ones; each model is scored as soon as it is
        # ready (and its scores stored), so an interrupted comparison keeps what it measured
        for m in sorted(models, key=lambda m: m.reuses is not None):
            if m.reuses is None:
                run = out / "runs" / m.label / f"seed{seed}"
                cfg = load_config(m.config, base + [f"train.seed={seed}", f"output={run}"] + budget + m.overrides)
                console.rule(f"{m.label} (seed {seed})")
                trained[m.label] = _train_or_reuse(cfg, source.num_classes)
                if trained[m.label].history:
                    histories[f"{m.label} s{seed}"] = trained[m.label].history
                scoring = []
            else:
                ckpt = RunDir(out / "runs" / m.reuses / f"seed{seed}").best_checkpoint
                predictor = Predictor.from_checkpoint(ckpt, device="cpu", use_cache=True, overrides=m.overrides)
                source_model = trained[m.reuses]
                trained[m.label] = Trained(predictor, [], source_model.train_seconds, source_model.fingerprint)
                scoring = m.overrides
            store = ScoreStore(out / "scores", m.label, seed)
            for test_set, case in test_cases:
                console.print(f"scoring {m.label} (seed {seed}) on {case.id}" + (f" [{test_set}]" if test_set else ""))
                pred, scores, seconds = _evaluate_stored(store, trained[m.label], scoring, test_set, case, classes)
                if seed == seeds[0] and case is test_cases[0][1]:
                    shown[m.label] = pred
                    plotters[m.label] = trained[m.label].predictor
                slices = case.label.shape[trained[m.label].predictor.axis]
                for s in scores:
                    rows.append({"model": m.label, "seed": seed, "case": case.id,
                                 **({"test_set": test_set or "source"} if named_sets else {}), **s,
                                 "train_s": round(trained[m.label].train_seconds, 1),
                                 **trained[m.label].convergence(),
                                 "predict_s_per_slice": seconds / slices})
    _write_report(out / report, rows, histories, shown, plotters, test_cases[0][1], title, models, budget, seeds,
                  time.time() - t0, overlays)
    return rows


def _target_cases(targets: Sequence[tuple[str, Path]], base: Sequence[str], num_classes: int) -> list[tuple]:
    """``(name, case)`` for every test case of every target dataset; a target with another class count is an error
    naming it (a comparison scores the same classes everywhere)."""
    cases = []
    for name, folder in targets:
        target = open_source(load_config(None, [*base, f"data.path={folder}"]).data)
        if target.num_classes != num_classes:
            raise ConfigError(f"target {name!r} ({folder}) has {target.num_classes} foreground classes, the "
                              f"comparison's data {num_classes}")
        ids = target.make_split().test
        if not ids:
            raise ConfigError(f"target {name!r} ({folder}): its split has no test cases")
        cases += [(name, target.load(case_id)) for case_id in ids]
    return cases


def plot_prompts(predictor: Predictor, case, picks: Sequence[int], path: Path) -> Path | None:
    """For a method that reports the point prompts it chose (``last_points``, e.g. ProMISe's APM), draw them with
    its prediction on the slices ``picks`` (the method's S x S frame); None for other methods."""
    if not hasattr(predictor.method, "last_points"):
        return None
    from .point_plots import plot_points

    slices = volume_slices(case, predictor.axis, predictor.method.input_size, predictor.intensity, predictor.geometry)
    items = [slices[i] for i in picks]
    saved, predictor.batch_size = predictor.batch_size, len(items)  # one batch: last_points covers every pick
    try:
        probs = torch.stack(predictor.predict_probabilities(items))
    finally:
        predictor.batch_size = saved
    method = predictor.method
    batch = collate(items)
    return plot_points(batch["image"], method.last_points, method.last_point_labels, path,
                       masks=probs.argmax(dim=1), truth=batch.get("label"),
                       titles=[f"slice {i}: {method.last_point_source} points" for i in picks])


def _write_report(report: Path, rows, histories, shown, plotters, case, title, models, budget, seeds, total,
                  overlays):
    named = any("test_set" in r for r in rows)  # one summary row per named test set
    columns = ["model", "seed", "case", *(["test_set"] if named else []), "class", *METRIC_ORDER, "train_s",
               *CONVERGENCE_KEYS, "predict_s_per_slice"]
    write_metrics(rows, columns, report)
    summary = summarize_rows(rows)
    keys = [*METRIC_ORDER, "train_s", *CONVERGENCE_KEYS, "predict_s_per_slice"]
    head = ["model", *(["test set"] if named else []), "class", "n"]
    lines = ["| " + " | ".join(head + keys) + " |", "|" + "---|" * (len(keys) + len(head))]
    lines += ["| " + " | ".join([r["model"], *([r["test_set"]] if named else []), str(r["class"]), str(r["n"])]
                                + [_cell(r, k) for k in keys]) + " |" for r in summary]
    spec = "\n".join(f"- `{m.label}`: `{m.config}`" + (f" with `{' '.join(m.overrides)}`" if m.overrides else "")
                     for m in models)
    text = (f"# {title}\n\nBudget: {' '.join(budget) or 'the presets own'}; seeds {list(seeds)}. Test metrics in 3D "
            "per case and class, mean ± std over cases and seeds (HD95/ASSD in mm, HD95_vox in voxels, NSD at 1 mm)."
            "\n\n"
            + "\n".join(lines) + f"\n\nModels:\n\n{spec}\n\nTotal wall time: {total / 60:.1f} min.\n")
    if histories:
        plot_training_curves(histories, report / "training_curves.png")
        text += "\n![training curves](training_curves.png)\n"
    if overlays and shown:
        fg = [z for z in range(case.label.shape[0]) if case.label[z].any()]
        picks = [fg[int(i)] for i in np.linspace(0, len(fg) - 1, 4)] if fg else [case.label.shape[0] // 2]
        plot_overlays(case.image[0], case.label, shown, picks, report / "overlays.png")
        text += "\n![overlays](overlays.png)\n"
        for label, predictor in plotters.items():
            if plot_prompts(predictor, case, picks, report / f"points_{label}.png") is not None:
                text += f"\n`{label}`: the point prompts it chose (green +: positive, red x: negative)\n\n" \
                        f"![points {label}](points_{label}.png)\n"
    atomic_write_text(report / "README.md", text)
    atomic_write_text(report / "summary.md", "\n".join(lines) + "\n")
    table = Table(title=title)  # the terminal gets the main columns; README.md has them all
    brief = [k for k in keys if k in CONSOLE_KEYS]
    for c in (*head[:-1], *brief):
        table.add_column(c)
    for r in summary:
        table.add_row(r["model"], *([r["test_set"]] if named else []), str(r["class"]), *[_cell(r, k) for k in brief])
    Console().print(table)
    console.print(f"report: {report}  (total {total / 60:.1f} min)")
