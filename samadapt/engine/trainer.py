"""The training loop: optimiser + schedule, accumulation, AMP, validation on a split carved from the training data,
best-checkpoint selection and early stopping, CSV/TensorBoard logs, rich progress, exact resume, DDP.

Resume granularity is the epoch. The end of an epoch is committed as one unit: ``state.pt`` (weights,
optimiser, scheduler, scaler, RNG states, best-so-far, counters and the log history) is written atomically first;
``checkpoints/last.*``, ``checkpoints/best.*``, ``log.csv`` and the TensorBoard scalars are then derived from it.
A kill at any instant leaves either the previous commit or the new one, and ``resume=True`` rewrites the derived
files from the commit before continuing with the next epoch as if training had never stopped (the shuffling
order of epoch e depends only on ``seed + e``), so no log row is ever held twice.
"""

from __future__ import annotations

import csv
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from ..errors import TrainingError
from ..io_utils import atomic_path
from ..methods.base import Method
from . import distributed as dist_utils
from .checkpoint import (adapter_state, apply_adapter_state, load_checkpoint, load_training_state, rng_state,
                         save_checkpoint, save_training_state, set_rng_state)
from ..config.run_config import TrainConfig
from .allocator import keep_freed_memory
from .device import autocast, to_device
from .fast import resolve_amp
from .rundir import RunDir
from .schedulers import build_optimizer, build_scheduler
from .validation import validate

console = Console(stderr=True)


@dataclass
class TrainResult:
    best_checkpoint: Path
    last_checkpoint: Path
    history: list[dict[str, Any]] = field(default_factory=list)
    best_metric: float = float("nan")
    """Validation Dice of the best epoch (the one chosen by ``train.select_on``); NaN without validation data."""
    stopped_early: bool = False
    seconds: float = 0.0


def default_collate(items: list[dict]) -> dict:
    """Stack tensors; keep everything else as lists."""
    out: dict[str, Any] = {}
    for key in items[0]:
        values = [it[key] for it in items]
        out[key] = torch.stack(values) if isinstance(values[0], torch.Tensor) else values
    return out


class Trainer:
    """Trains one method. ``feature_source(batch)`` (optional) returns cached ``Features`` for a batch."""

    def __init__(self, method: Method, cfg: TrainConfig, out_dir: str | Path, manifest: dict[str, Any],
                 device: torch.device, collate: Callable = default_collate,
                 feature_source: Callable[[dict], Any] | None = None):
        self.method = method
        self.cfg = cfg
        self.run = RunDir(out_dir)
        self.manifest = manifest
        self.device = device
        self.collate = collate
        self.feature_source = feature_source
        self.amp = resolve_amp(cfg.amp, device)
        """The autocast mode used (``train.amp`` with auto resolved for ``device``)."""

    # --- helpers ---------------------------------------------------------------------------------------------
    def _prepare(self, batch: dict) -> dict:
        if self.feature_source is not None:
            batch = dict(batch, features=self.feature_source(batch))
        return to_device(batch, self.device)

    def _loader(self, ds: Dataset, epoch: int) -> DataLoader:
        generator = torch.Generator().manual_seed(self.cfg.seed + epoch)
        sampler = None
        if dist_utils.world_size() > 1:
            sampler = DistributedSampler(ds, shuffle=True, seed=self.cfg.seed, drop_last=False)
            sampler.set_epoch(epoch)
        return DataLoader(ds, batch_size=self.cfg.batch_size, shuffle=sampler is None, sampler=sampler,
                          generator=generator, collate_fn=self.collate, num_workers=self.cfg.num_workers,
                          drop_last=len(ds) > self.cfg.batch_size * max(dist_utils.world_size(), 1))

    def _checkpoint_manifest(self, epoch: int, metrics: dict[str, Any]) -> dict[str, Any]:
        return {**self.manifest, "epoch": epoch, "metrics": metrics}

    # --- main loop -------------------------------------------------------------------------------------------
    def fit(self, train_ds: Dataset, val_ds: Dataset | None, resume: bool = False) -> TrainResult:
        cfg, method = self.cfg, self.method
        self.run.path.mkdir(parents=True, exist_ok=True)
        if cfg.reuse_memory:
            keep_freed_memory()
        main = dist_utils.is_main()
        model: torch.nn.Module = method
        if dist_utils.world_size() > 1:
            model = torch.nn.parallel.DistributedDataParallel(
                method, device_ids=[self.device.index] if self.device.type == "cuda" else None,
                broadcast_buffers=False, find_unused_parameters=True)
        optimizer = build_optimizer(method.param_groups(cfg.lr), cfg)
        steps_per_epoch = max(math.ceil(len(self._loader(train_ds, 0)) / cfg.grad_accum), 1)
        val_every = max(cfg.val_every, math.ceil((cfg.val_every_steps or 1) / steps_per_epoch))
        scheduler = build_scheduler(optimizer, cfg, steps_per_epoch * cfg.epochs)
        scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp == "fp16")

        start_epoch, best, best_epoch, bad_validations, history = 0, -math.inf, 0, 0, []
        state: dict[str, Any] | None = None
        if resume:
            state_path = self.run.state
            state = load_training_state(state_path)
            if "weights" in state:
                apply_adapter_state(method, state["weights"], state_path)
            else:  # a state.pt written before the weights were part of the commit
                load_checkpoint(method, self.run.last_checkpoint)
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
            scaler.load_state_dict(state["scaler"])
            set_rng_state(state["rng"])
            start_epoch, best = state["epoch"] + 1, state["best"]
            best_epoch = state.get("best_epoch", 0)
            bad_validations, history = state["bad_validations"], state["history"]
            if main:
                console.print(f"[bold]resuming[/] from epoch {start_epoch + 1} (best epoch {best_epoch})")
        else:
            torch.manual_seed(cfg.seed)

        writer = None
        if main:
            from torch.utils.tensorboard import SummaryWriter

            if resume:  # the scalars are rewritten from the committed history: none twice, none missing
                for old in self.run.tensorboard.glob("events.out.tfevents.*"):
                    old.unlink()
            writer = SummaryWriter(str(self.run.tensorboard))
            if state is not None:
                self._publish(state, writer, resumed=True)
        t_start = time.time() - (history[-1]["seconds"] if history else 0.0)
        steps = int(history[-1].get("steps", 0)) if history else 0  # optimizer steps so far (resumes included)
        stopped_early = False
        progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                            TextColumn("loss {task.fields[loss]:.4f}"), TimeElapsedColumn(), TimeRemainingColumn(),
                            console=console, disable=not main, transient=False)
        with progress:
            task = progress.add_task("train", total=steps_per_epoch * cfg.epochs,
                                     completed=steps_per_epoch * start_epoch, loss=float("nan"))
            for epoch in range(start_epoch, cfg.epochs):
                method.train()
                method.on_epoch_start(epoch, cfg.epochs)
                progress.update(task, description=f"epoch {epoch + 1}/{cfg.epochs}")
                running, count = 0.0, 0
                term_sums: dict[str, float] = {}  # the loss's other terms (bce, dice, class1_loss, ...)
                optimizer.zero_grad(set_to_none=True)
                if hasattr(train_ds, "set_epoch"):
                    train_ds.set_epoch(epoch)  # redraws sampled empty slices and augmentation seeds
                loader = self._loader(train_ds, epoch)
                out_of_time = False
                for i, batch in enumerate(loader):
                    batch = self._prepare(batch)
                    with autocast(self.device, self.amp):
                        output = model(batch)
                        terms = method.loss(output, batch)
                    loss = terms["loss"]
                    if not torch.isfinite(loss):
                        raise TrainingError(f"non-finite loss {float(loss.detach())} at epoch {epoch + 1}, batch {i + 1} "
                                            f"({_batch_cases(batch)}); training stopped with {epoch} epoch(s) saved "
                                            "(lower train.lr, set train.grad_clip or check these cases)")
                    scaler.scale(loss / cfg.grad_accum).backward()
                    if (i + 1) % cfg.grad_accum == 0 or i + 1 == len(loader):
                        if cfg.grad_clip:
                            scaler.unscale_(optimizer)
                            torch.nn.utils.clip_grad_norm_([p for _, p in method.trainable_parameters()],
                                                           cfg.grad_clip)
                        scaler.step(optimizer)
                        scaler.update()
                        optimizer.zero_grad(set_to_none=True)
                        scheduler.step()
                        steps += 1
                        progress.advance(task)
                        # One process: stop inside the epoch when the budget is spent (DDP ranks would disagree on
                        # the step, so they stop at the end of an epoch).
                        out_of_time = self._over_budget(t_start) and dist_utils.world_size() == 1
                    running += float(loss.detach())
                    for name, value in terms.items():
                        if name != "loss" and value.numel() == 1:
                            term_sums[name] = term_sums.get(name, 0.0) + float(value.detach())
                    count += 1
                    progress.update(task, loss=running / count)
                    if out_of_time:
                        break
                record: dict[str, Any] = {"epoch": epoch + 1, "steps": steps, "train_loss": running / max(count, 1),
                                          "lr": optimizer.param_groups[0]["lr"],
                                          "train_terms": {k: v / max(count, 1) for k, v in term_sums.items()}}
                improved = False
                if val_ds is not None and len(val_ds) and ((epoch + 1) % val_every == 0 or out_of_time):
                    val = validate(method, val_ds, self.collate, self._prepare, cfg.batch_size, self.amp, self.device)
                    record.update({f"val_{k}": v for k, v in val.items()})
                    score = selection_score(val, cfg.select_on)
                    improved = score > best
                    if improved:
                        best, bad_validations = score, 0
                    else:
                        bad_validations += 1
                elif val_ds is None or not len(val_ds):
                    improved = True  # no validation data: the last epoch is the best one
                if improved:
                    best_epoch = epoch + 1
                record["seconds"] = time.time() - t_start
                history.append(record)
                if main:
                    state = {
                        "epoch": epoch, "best": best, "best_epoch": best_epoch, "bad_validations": bad_validations,
                        "history": history, "weights": adapter_state(method), "optimizer": optimizer.state_dict(),
                        "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(), "rng": rng_state(),
                    }
                    save_training_state(self.run.state, state)  # the commit
                    self._publish(state, writer)
                dist_utils.barrier()
                if cfg.patience is not None and bad_validations >= cfg.patience:
                    stopped_early = True
                    if main:
                        console.print(f"early stop after epoch {epoch + 1}: no val improvement for {cfg.patience}")
                    break
                if out_of_time or self._over_budget(t_start):
                    stopped_early = True
                    if main:
                        where = f"during epoch {epoch + 1} (step {count})" if out_of_time else f"after epoch {epoch + 1}"
                        console.print(f"time budget of {cfg.max_minutes} min reached {where}")
                    break
        if writer is not None:
            writer.close()
        best_dice = history[best_epoch - 1].get("val_dice", math.nan) if best > -math.inf else math.nan
        return TrainResult(self.run.best_checkpoint, self.run.last_checkpoint, history,
                           best_dice, stopped_early, history[-1]["seconds"] if history else 0.0)

    def _over_budget(self, t_start: float) -> bool:
        """Whether ``train.max_minutes`` (training time since the run began, resumes included) is spent."""
        return self.cfg.max_minutes is not None and time.time() - t_start > 60 * self.cfg.max_minutes

    def _publish(self, state: dict[str, Any], writer, resumed: bool = False) -> None:
        """Write what derives from a committed ``state``: last (and, for a new best, best) checkpoints, log.csv and
        the TensorBoard scalars (all of the history after a resume, the new epoch otherwise)."""
        history, epoch = state["history"], state["epoch"] + 1
        save_checkpoint(self.method, self.run.last_checkpoint,
                        self._checkpoint_manifest(epoch, history[-1]), tensors=state["weights"])
        if state["best_epoch"] == epoch:
            save_checkpoint(self.method, self.run.best_checkpoint,
                            self._checkpoint_manifest(epoch, history[-1]), tensors=state["weights"])
        fields = ["epoch", "steps", "train_loss", "val_loss", "val_dice", "lr", "seconds"]
        with atomic_path(self.run.log_csv) as tmp, tmp.open("w", newline="") as handle:
            w = csv.DictWriter(handle, fieldnames=fields, extrasaction="ignore")
            w.writeheader()
            w.writerows(history)
        for record in history if resumed else history[-1:]:
            for key, value in record.items():
                if key not in ("epoch", "steps") and isinstance(value, (int, float)):
                    writer.add_scalar(key.replace("_", "/", 1), value, record["epoch"])
            for name, value in record.get("train_terms", {}).items():  # TensorBoard only: train/<term>
                writer.add_scalar(f"train/{name}", value, record["epoch"])
        if not resumed:
            parts = [f"{k}={v:.4g}" for k, v in history[-1].items() if isinstance(v, float)]
            console.print(f"epoch {epoch}: " + " ".join(parts))


def selection_score(val: dict[str, Any], select_on: str) -> float:
    """The validation score the best checkpoint maximises: Dice (``select_on="dice"``) or minus the loss
    (``"loss"``; DeSAM's release keeps the lowest validation DiceCE loss)."""
    return val["dice"] if select_on == "dice" else -val["loss"]


def _batch_cases(batch: dict) -> str:
    """The cases (and slices) of a batch, for error messages."""
    cases, slices = batch.get("case"), batch.get("slice")
    if cases is None:
        return "items " + ", ".join(map(str, batch.get("key", [])[:8]))
    if slices is not None:
        return "cases " + ", ".join(f"{c} slice {int(s)}" for c, s in list(zip(cases, slices))[:8])
    return "cases " + ", ".join(map(str, cases[:8]))
