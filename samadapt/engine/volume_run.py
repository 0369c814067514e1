"""3D M-SAM (``samadapt.methods.msam3d``) on whole volumes: the Python API behind ``samadapt train3d`` and
``samadapt predict3d``.

Training (``train3d``): the labelled cases of a 3D dataset (an nnU-Net raw folder, or anything
``samadapt.data.readers`` opens) are split by case; each training case becomes one S^3 patch once
(``volume3d.training_patch``: CT clamp, crop/pad around the label, z-normalisation; S = the backbone's cube side).
Step ``n`` trains on ``train.batch_size`` patches drawn with ``seed + n`` (B x 1 x S^3 images, B x S^3 labels),
``train.iterations`` click iterations in ``MSAM3D.training_loss``, AdamW on ``MSAM3D.param_groups``. Every
``train.val_every`` steps the validation cases are predicted whole (sliding window, click-free or after
``train.val_clicks`` simulated clicks per window) and their pooled foreground Dice picks ``checkpoints/best``; that
round is committed as one unit in ``state.pt`` (``RunDir.trained_epochs`` counts rounds), then ``checkpoints/last``,
``best`` and ``log.csv`` are derived from it, as the 2D trainer does with epochs. ``train.patience`` rounds without
a better Dice stop the run; ``resume`` continues after the last commit (same configuration and data unless
``allow_changes``). The run folder is ``samadapt.engine.rundir``'s layout (no TensorBoard), its ``config.yaml``
a ``Volume3DConfig`` and its manifest ``kind: msam3d``.

Prediction (``predict3d``): each volume through ``volume3d.predict_case_volume``, written with its geometry as
``OUT/<case><ending>`` (foreground = ``data.label`` or 1), and ``OUT/prediction.json``.

The official SAM-Med3D weights are not bundled or downloaded: ``backbone.checkpoint`` names them;
``backbone.size=tiny`` is a small random SAM-Med3D (``TINY``, 32^3 cubes) for tests and demonstrations.
"""

from __future__ import annotations

import csv
import dataclasses
import math
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from ..backbones.sam_med3d import SamMed3D
from ..data.clicks import POLICIES
from ..data.readers import open_dataset
from ..data.volume3d import predict_case_volume, training_patch
from ..errors import ConfigError, InputError, TrainingError
from ..io_utils import FolderLock, atomic_path, atomic_write_json, atomic_write_text, check_output_dir, \
    clean_stale_parts
from ..layers.mask_enhanced_adapter import TOKEN_MODES
from ..methods.msam3d import MSAM3D
from ..methods.options import option, typed_fields
from ..overlap import dice_from_counts, mask_counts
from .checkpoint import (adapter_state, apply_adapter_state, load_checkpoint, load_training_state, rng_state,
                         save_checkpoint, save_training_state, set_rng_state)
from .device import resolve_device
from .manifest import base_manifest
from .run import check_target, config_differences, data_differences, dataset_fingerprint, open_source
from .rundir import RunDir
from .schedulers import build_optimizer, build_scheduler
from .trainer import TrainResult

KIND = "msam3d"
TINY = {"input_size": 32, "patch": 8, "width": 24, "depth": 2, "heads": 2, "out": 48, "window": 3,
        "global_blocks": (1,), "decoder_mlp": 32, "iou_hidden": 16}
"""``backbone.size=tiny``: a random SAM-Med3D at 32^3 (4^3 tokens of 48 channels), seconds per CPU step."""


@dataclass
class Backbone3DSpec:
    size: str = option("official", choices=("official", "tiny"))
    """official (SAM-Med3D ViT-B at 128^3; needs ``checkpoint``) | tiny (``TINY``, random: tests and demos)."""
    checkpoint: str | None = None
    """SAM-Med3D weights (``sam_med3d.pth`` / ``sam_med3d_turbo.pth``; official keys, checked on load)."""


@dataclass
class MSAM3DOptions:
    """``MSAM3D``'s constructor options (see its module docstring)."""
    lora_rank: int = option(4, ge=1)
    mea_heads: int = option(6, ge=1)
    mea_tokens: str = option("full", choices=TOKEN_MODES)
    sam_lr_scale: float = option(0.1, gt=0)
    click_mode: str = option("random", choices=POLICIES)
    """Training clicks from the error region (the release: random)."""
    eval_click_mode: str = option("center", choices=POLICIES)
    """Validation / prediction clicks (deterministic)."""
    multi_click: bool = False
    """Prompt with every click so far instead of the newest one."""
    infer_iterations: int = option(3, ge=1)
    """Click-free refinement iterations at validation and prediction."""


@dataclass
class Data3DConfig:
    path: str = ""
    """A 3D dataset: nnU-Net raw (dataset.json, imagesTr/, labelsTr/), one channel per case."""
    format: str = "auto"
    label: int | None = option(None, ge=1)
    """Foreground class id; None: every label > 0 (the release's single-lesion datasets)."""
    val_fraction: float = option(0.2, ge=0, lt=1)
    """Cases held out for validation (the release: a random 80/20 split of the training data)."""
    test_fraction: float = option(0.0, ge=0, lt=1)
    split_seed: int = 0
    split_file: str | None = None
    """JSON {"train": [...], "val": [...], "test": [...]} case lists; overrides the fractions."""
    nonfinite: str = option("error", choices=("error", "zero"))


@dataclass
class Train3DConfig:
    steps: int = option(2000, ge=1)
    """Optimiser steps in all."""
    batch_size: int = option(2, ge=1)
    lr: float = option(8e-4, gt=0)
    weight_decay: float = option(0.1, ge=0)
    optimizer: str = option("adamw", choices=("adamw", "adam", "sgd"))
    betas: tuple[float, float] = (0.9, 0.999)
    scheduler: str = option("multistep", choices=("constant", "poly", "warmup_poly", "multistep", "cosine"))
    """Per step, as ``samadapt.engine.schedulers`` (the release: x0.1 at 60 % and 90 % of the steps)."""
    milestones: tuple[float, ...] = (0.6, 0.9)
    gamma: float = option(0.1, gt=0)
    warmup_steps: int = option(0, ge=0)
    poly_power: float = option(0.9, gt=0)
    iterations: int = option(11, ge=1)
    """Click iterations per training step (11 as released)."""
    val_every: int = option(100, ge=1)
    """Steps between validations (one commit of ``state.pt`` each)."""
    val_clicks: int = option(0, ge=0)
    """Validate after this many simulated clicks per window (``model.eval_click_mode``); 0: click-free."""
    overlap: float = option(0.5, ge=0, lt=1)
    """Sliding-window overlap (fraction of the cube side) at validation and prediction."""
    patience: int | None = option(None, ge=1)
    """Stop after this many validations without a better Dice."""
    max_minutes: float | None = option(None, gt=0)
    """Stop (validate, commit) after the step during which this wall-time budget ran out."""
    seed: int = 2023
    device: str = "auto"
    threads: int | None = option(None, ge=1)


SECTIONS = {"backbone": Backbone3DSpec, "model": MSAM3DOptions, "data": Data3DConfig, "train": Train3DConfig}


@dataclass
class Volume3DConfig:
    """A 3D run: ``backbone``, ``model``, ``data``, ``train`` sections and the run folder ``output``."""
    backbone: Backbone3DSpec = field(default_factory=Backbone3DSpec)
    model: MSAM3DOptions = field(default_factory=MSAM3DOptions)
    data: Data3DConfig = field(default_factory=Data3DConfig)
    train: Train3DConfig = field(default_factory=Train3DConfig)
    output: str = "runs/msam3d"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "Volume3DConfig":
        """Sections typed and range-checked (``typed_fields``); ``ConfigError`` names an unknown key or bad value."""
        unknown = sorted(set(values) - set(SECTIONS) - {"output"})
        if unknown:
            raise ConfigError(f"unknown config key(s) {unknown}; valid: {sorted(SECTIONS) + ['output']}")
        parts = {}
        for name, section in SECTIONS.items():
            given = values.get(name) or {}
            if not isinstance(given, dict):
                raise ConfigError(f"{name}: expected a mapping, got {given!r}")
            parts[name] = section(**typed_fields(section, given, f"{name}."))
        return cls(**parts, output=str(values.get("output", cls.output)))


def volume_config(overrides: list[str], base: dict[str, Any] | None = None) -> Volume3DConfig:
    """``Volume3DConfig`` of ``base`` (a ``to_dict`` mapping) with dotted ``section.key=value`` overrides."""
    values: dict[str, Any] = {k: dict(v) if isinstance(v, dict) else v for k, v in (base or {}).items()}
    for item in overrides:
        dotted, sep, value = item.partition("=")
        section, dot, key = dotted.strip().partition(".")
        if not sep or (section != "output" and not (dot and key)):
            raise ConfigError(f"override {item!r} must look like section.key=value (e.g. train.steps=100)")
        if section == "output":
            values["output"] = value
        else:
            values.setdefault(section, {})[key] = value
    return Volume3DConfig.from_dict(values)


def read_volume_config(path: Path) -> Volume3DConfig:
    if not path.is_file():
        raise InputError(path, "missing: cannot tell which configuration the run used")
    return Volume3DConfig.from_dict(yaml.safe_load(path.read_text()) or {})


def build_backbone3d(spec: Backbone3DSpec) -> SamMed3D:
    """The tiny random SAM-Med3D, or the official one from ``spec.checkpoint`` (required)."""
    if spec.size == "tiny":
        if spec.checkpoint:
            raise ConfigError("backbone.size=tiny is a random test backbone and takes no checkpoint; drop "
                              "backbone.checkpoint or use backbone.size=official")
        return SamMed3D.build(**TINY)
    if not spec.checkpoint:
        raise ConfigError("3D M-SAM needs the SAM-Med3D weights, which samadapt does not bundle or download: give "
                          "the file with --checkpoint PATH (backbone.checkpoint; sam_med3d_turbo.pth or "
                          "sam_med3d.pth), or --tiny (backbone.size=tiny) for a small random backbone")
    return SamMed3D.build(checkpoint=spec.checkpoint)


def build_model(config: Volume3DConfig, device: torch.device) -> MSAM3D:
    backbone = build_backbone3d(config.backbone)
    torch.manual_seed(config.train.seed)
    return MSAM3D(backbone, **dataclasses.asdict(config.model)).to(device)


# --- data --------------------------------------------------------------------------------------------------------
def check_volume(case) -> None:
    """``InputError`` unless ``case`` is a one-channel 3D volume."""
    where = case.source or case.id
    if case.is_2d or min(case.shape) < 2:
        raise InputError(where, f"case {case.id!r} is 2D (shape {case.shape}); 3D M-SAM needs volumes (use "
                                "`samadapt train` / `predict` for 2D data)")
    if case.num_channels != 1:
        raise InputError(where, f"case {case.id!r} has {case.num_channels} channels; 3D M-SAM reads one")


def foreground(label: np.ndarray, fg: int | None) -> np.ndarray:
    """Boolean foreground of a class map: ``label == fg``, or ``label > 0`` when ``fg`` is None."""
    return np.asarray(label) > 0 if fg is None else np.asarray(label) == fg


def check_label(source, fg: int | None) -> None:
    if fg is not None and fg not in source.labels.values():
        raise ConfigError(f"data.label={fg} is not a class of {source.root}: its labels are {source.labels}")


def validate(model: MSAM3D, cases: list, fg: int | None, overlap: float, clicks: int = 0) -> float:
    """Foreground Dice pooled over ``cases`` (whole volumes, sliding window; ``clicks`` simulated per window)."""
    model.eval()
    counts = np.zeros(3)
    for case in cases:
        gt = foreground(case.label, fg)
        pred = predict_case_volume(case, model.patch_predictor(clicks), model.size, overlap,
                                   label=gt if clicks else None)
        counts += mask_counts(pred > 0, gt)
    model.train()
    return float(dice_from_counts(counts))


# --- training ----------------------------------------------------------------------------------------------------
def _check_target(config: Volume3DConfig, run: RunDir, resume: bool, overwrite: bool, allow_changes: bool) -> None:
    """The 2D ``run.check_target`` (rounds for epochs), refusing to resume a folder another command trained."""
    if resume and not overwrite and run.trained_epochs() is not None and run.manifest.get("kind") != KIND:
        raise InputError(run.path, "not a run folder of `samadapt train3d`")
    check_target(run, config, lambda: read_volume_config(run.config_yaml), resume, overwrite, allow_changes,
                 unit="round")


def train3d(config: Volume3DConfig, resume: bool = False, overwrite: bool = False,
            allow_changes: bool = False) -> TrainResult:
    """Train 3D M-SAM into ``config.output`` (see the module docstring); every check runs before anything is
    written."""
    t = config.train
    out = check_output_dir(config.output)
    run = RunDir(out)
    _check_target(config, run, resume, overwrite, allow_changes)
    device = resolve_device(t.device)
    if t.threads:
        torch.set_num_threads(t.threads)
    source = open_source(config.data)
    check_label(source, config.data.label)
    if not source.case_ids:
        raise InputError(config.data.path, "no labelled case to train on (train3d needs imagesTr + labelsTr)")
    split = source.make_split(val_fraction=config.data.val_fraction, test_fraction=config.data.test_fraction,
                              seed=config.data.split_seed,
                              **({"split_file": config.data.split_file} if config.data.split_file else {}))
    train_cases, val_cases = source.load_all(split.train), source.load_all(split.val) if split.val else []
    for case in train_cases + val_cases:
        check_volume(case)
    if not train_cases:
        raise InputError(config.data.path, f"the split of {len(source.case_ids)} case(s) leaves none to train on")
    model = build_model(config, device)
    manifest = base_manifest(
        kind=KIND, backbone=model.backbone.describe(), config=config.to_dict(), seed=t.seed, device=str(device),
        model={"options": dataclasses.asdict(config.model),
               "trainable_parameters": sum(p.numel() for _, p in model.trainable_parameters())},
        data={"source": source.describe(), "split": split.to_dict(),
              "fingerprint": dataset_fingerprint(train_cases + val_cases)})
    if resume:
        changed = data_differences(run.manifest.get("data"), manifest["data"])
        if changed and not allow_changes:
            raise InputError(config.data.path, f"--resume on data that differs from the run's in {out}: "
                                               f"{'; '.join(changed)}. Pass --allow-changes to resume anyway")
        changed += config_differences(read_volume_config(run.config_yaml), config)
        if changed:
            manifest["resumed_with_changes"] = changed
    patches = [training_patch(c.image[0], foreground(c.label, config.data.label), model.size, c.modality == "CT")
               for c in train_cases]
    with FolderLock(out):
        _check_target(config, run, resume, overwrite, allow_changes)  # again, now that no one else writes
        clean_stale_parts(out)
        if overwrite:
            for path in run.outputs:
                shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
        atomic_write_text(run.config_yaml, yaml.safe_dump(_plain(config.to_dict()), sort_keys=False))
        atomic_write_json(run.manifest_json, manifest)
        if not val_cases:
            from .trainer import console

            console.print("no validation case (data.val_fraction=0): the last round is kept as best")
        result = _fit(model, config, patches, val_cases, run, manifest, device, resume)
        best = None if math.isnan(result.best_metric) else result.best_metric
        manifest["training"] = {"steps_run": int(result.history[-1]["step"]), "best_val_dice": best,
                                "seconds": result.seconds, "stopped_early": result.stopped_early}
        atomic_write_json(run.manifest_json, manifest)
    return result


def _batch(patches: list, step: int, batch_size: int, seed: int, device: torch.device) -> tuple:
    """The patches of step ``step``: ``batch_size`` drawn with ``seed + step`` -> (B x 1 x S^3, B x S^3 bool)."""
    rng = np.random.default_rng(seed + step)
    pick = rng.choice(len(patches), size=batch_size, replace=len(patches) < batch_size)
    image = torch.from_numpy(np.stack([patches[i][0] for i in pick]))[:, None]
    label = torch.from_numpy(np.stack([patches[i][1] for i in pick]))
    return image.to(device), label.to(device)


def _fit(model: MSAM3D, config: Volume3DConfig, patches: list, val_cases: list, run: RunDir,
         manifest: dict[str, Any], device: torch.device, resume: bool) -> TrainResult:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, \
        TimeRemainingColumn

    from .trainer import console

    t = config.train
    optimizer = build_optimizer(model.param_groups(t.lr), t)
    scheduler = build_scheduler(optimizer, t, t.steps)
    rounds = math.ceil(t.steps / t.val_every)
    start, best, best_round, bad, history = 0, -math.inf, 0, 0, []
    if resume:
        state = load_training_state(run.state)
        apply_adapter_state(model, state["weights"], run.state)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        set_rng_state(state["rng"])
        start, best, best_round = state["epoch"] + 1, state["best"], state["best_epoch"]
        bad, history = state["bad_validations"], state["history"]
        console.print(f"[bold]resuming[/] after step {int(history[-1]['step'])} (best at step "
                      f"{int(history[best_round - 1]['step']) if best_round else 0})")
    else:
        torch.manual_seed(t.seed)
    t_start = time.time() - (history[-1]["seconds"] if history else 0.0)
    stopped = False
    model.train()
    progress = Progress(TextColumn("[bold]train3d"), BarColumn(), MofNCompleteColumn(),
                        TextColumn("loss {task.fields[loss]:.4f}"), TimeElapsedColumn(), TimeRemainingColumn(),
                        console=console, transient=False)
    with progress:
        task = progress.add_task("train3d", total=t.steps, completed=min(start * t.val_every, t.steps),
                                 loss=float("nan"))
        for r in range(start, rounds):
            losses, out_of_time = [], False
            for step in range(r * t.val_every, min((r + 1) * t.val_every, t.steps)):
                image, label = _batch(patches, step, t.batch_size, t.seed, device)
                loss = model.training_loss(image, label, t.iterations)
                if not torch.isfinite(loss):
                    raise TrainingError(f"non-finite loss {float(loss.detach())} at step {step + 1}; training "
                                        f"stopped with {r} round(s) saved (lower train.lr)")
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                scheduler.step()
                losses.append(float(loss.detach()))
                progress.update(task, advance=1, loss=float(np.mean(losses)))
                out_of_time = t.max_minutes is not None and time.time() - t_start > 60 * t.max_minutes
                if out_of_time:
                    break
            record: dict[str, Any] = {"step": step + 1, "train_loss": float(np.mean(losses)),
                                      "lr": optimizer.param_groups[0]["lr"]}
            improved = True  # without validation cases the last round is the best
            if val_cases:
                record["val_dice"] = validate(model, val_cases, config.data.label, t.overlap, t.val_clicks)
                improved = record["val_dice"] > best
                best, bad = (record["val_dice"], 0) if improved else (best, bad + 1)
            if improved:
                best_round = r + 1
            record["seconds"] = time.time() - t_start
            history.append(record)
            state = {"epoch": r, "best": best, "best_epoch": best_round, "bad_validations": bad,
                     "history": history, "weights": adapter_state(model), "optimizer": optimizer.state_dict(),
                     "scheduler": scheduler.state_dict(), "rng": rng_state()}
            save_training_state(run.state, state)  # the commit
            _publish(model, run, manifest, state)
            progress.console.print(f"step {record['step']}: " + " ".join(
                f"{k}={v:.4g}" for k, v in record.items() if k != "step"))
            if t.patience is not None and bad >= t.patience:
                stopped = True
                console.print(f"early stop after step {record['step']}: no val improvement for {t.patience} "
                              "validations")
                break
            if out_of_time:
                stopped = True
                console.print(f"time budget of {t.max_minutes} min reached at step {record['step']}")
                break
    best_dice = history[best_round - 1].get("val_dice", math.nan) if best_round else math.nan
    return TrainResult(run.best_checkpoint, run.last_checkpoint, history, best_dice, stopped, history[-1]["seconds"])


def _publish(model: MSAM3D, run: RunDir, manifest: dict[str, Any], state: dict[str, Any]) -> None:
    """What derives from a committed ``state``: last (and for a new best, best) checkpoints and ``log.csv``."""
    history, r = state["history"], state["epoch"] + 1
    meta = {**manifest, "epoch": r, "step": history[-1]["step"], "metrics": history[-1]}
    save_checkpoint(model, run.last_checkpoint, meta, tensors=state["weights"])
    if state["best_epoch"] == r:
        save_checkpoint(model, run.best_checkpoint, meta, tensors=state["weights"])
    with atomic_path(run.log_csv) as tmp, tmp.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["step", "train_loss", "val_dice", "lr", "seconds"],
                                extrasaction="ignore")
        writer.writeheader()
        writer.writerows(history)


def _plain(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    return [_plain(v) for v in obj] if isinstance(obj, (list, tuple)) else obj


# --- prediction --------------------------------------------------------------------------------------------------
def load_run3d(path: str | Path, device: str = "auto") -> tuple[Volume3DConfig, MSAM3D, Path]:
    """(configuration, model with the best weights, checkpoint) of a ``train3d`` run folder; errors name it."""
    run = RunDir(path)
    if not run.path.is_dir():
        raise InputError(run.path, "no such run folder")
    if run.manifest.get("kind") != KIND:
        raise InputError(run.path, "not a run folder of `samadapt train3d` (for `samadapt train` runs use "
                                   "`samadapt predict`)")
    config = read_volume_config(run.config_yaml)
    checkpoint = run.checkpoint()
    model = build_model(config, resolve_device(device))
    load_checkpoint(model, checkpoint, expect_backbone=model.backbone.describe())
    return config, model.eval(), checkpoint


def predict3d(run: str | Path, inputs: str | Path, out: str | Path, clicks: int = 0,
              device: str = "auto") -> list[Path]:
    """Predict every volume of ``inputs`` (its test images, else its cases) with the run's best weights into
    ``out``; ``clicks`` > 0: after that many simulated clicks per window from each case's label (labelled cases
    only). Returns the files written."""
    if clicks < 0:
        raise ConfigError(f"--clicks {clicks}: expected >= 0")
    config, model, checkpoint = load_run3d(run, device)
    out = check_output_dir(out)
    source = open_dataset(inputs)
    ids = source.case_ids if clicks else (source.test_case_ids or source.case_ids)
    if not ids:
        raise InputError(inputs, "no labelled case: --clicks simulates clicks from labels (imagesTr + labelsTr)"
                         if clicks else "no image to predict")
    out.mkdir(parents=True, exist_ok=True)
    clean_stale_parts(out)
    from rich.progress import Progress

    from .trainer import console
    from ..data.cases import write_label_like

    written = []
    with Progress(console=console, transient=True) as progress:
        for case_id in progress.track(ids, description="predict3d"):
            case = source.load(case_id)
            check_volume(case)
            gt = None
            if clicks:
                if case.label is None:
                    raise InputError(case.source or case.id, f"case {case.id!r} has no label to simulate clicks")
                gt = foreground(case.label, config.data.label)
            mask = predict_case_volume(case, model.patch_predictor(clicks), model.size, config.train.overlap,
                                       label=gt)
            written.append(write_label_like(mask * np.uint8(config.data.label or 1), case,
                                            out / f"{case.id}{case.file_ending}"))
    atomic_write_json(out / "prediction.json", base_manifest(
        kind=KIND, run=str(run), checkpoint=str(checkpoint), inputs=str(inputs), clicks=clicks,
        overlap=config.train.overlap, device=str(next(model.parameters()).device), cases=sorted(ids)))
    return written
