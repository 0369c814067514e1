"""From a ``RunConfig`` to a trained, evaluated run folder: the Python API behind ``samadapt train``.

The run folder (``config.output``) is laid out as :mod:`samadapt.engine.rundir` says; ``.lock`` in it is held by
the process writing the folder (a second writer is refused).

Nothing is written before every check passed: option ranges, the output folder, the dataset, the model, and for a
folder that already holds a trained run, ``resume`` (same configuration and data, or ``allow_changes``) or
``overwrite``.
"""

from __future__ import annotations

import hashlib
import math
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import yaml

from ..backbones import Backbone, build_backbone
from ..data.cases import channel_mix
from ..data.preprocessing import Geometry, IntensityConfig
from ..data.readers import open_dataset
from ..data.slices import SliceDataset, collate
from ..data.splits import fewshot_slices
from ..errors import ConfigError, InputError
from ..io_utils import FolderLock, atomic_write_json, check_output_dir, clean_stale_parts
from ..methods import Method, build_method
from . import distributed as dist_utils
from ..config.run_config import DataConfig, RunConfig, check_config, save_config
from .device import resolve_device
from .manifest import base_manifest
from .rundir import RunDir
from .trainer import Trainer, TrainResult


@dataclass
class PreparedData:
    source: Any
    split: Any
    train: SliceDataset
    val: SliceDataset | None
    intensity: IntensityConfig
    fingerprint: str
    """SHA-256 over the ids, pixels and labels of the training and validation cases."""


def intensity_config(cfg: DataConfig) -> IntensityConfig:
    return IntensityConfig(mode=cfg.intensity_mode, window=cfg.window, window_min=cfg.window_min,
                           window_max=cfg.window_max, percentiles=tuple(cfg.percentiles))


def geometry_config(cfg: DataConfig) -> Geometry:
    """The slice geometry (``data.resize``, ``data.resize_via``) a run trains and predicts with."""
    return Geometry(resize=cfg.resize, via=cfg.resize_via)


def open_source(cfg: DataConfig):
    if not cfg.path:
        raise ConfigError("data.path is not set: point it at an nnU-Net raw dataset or a 2D images/masks folder")
    return open_dataset(cfg.path, cfg.format, nonfinite=cfg.nonfinite)


def dataset_fingerprint(cases: list) -> str:
    """SHA-256 (hex) over each case's id, image and label, in the given order."""
    digest = hashlib.sha256()
    for case in cases:
        digest.update(f"{case.id}|{case.image.shape}|".encode())
        digest.update(case.image.tobytes())
        if case.label is not None:
            digest.update(case.label.tobytes())
    return digest.hexdigest()


def prepare_data(cfg: DataConfig, input_size: int, seed: int = 0, source: Any = None) -> PreparedData:
    """Split the dataset by case and build the training/validation slice datasets."""
    source = source or open_source(cfg)
    if not source.case_ids:
        raise InputError(cfg.path, f"no labelled case to train on: this {source.format} input holds "
                                   f"{len(source.test_case_ids)} image(s) without labels (to predict); training "
                                   "needs an nnU-Net raw dataset, an images/ + masks/ folder or .npz files with masks")
    split = source.make_split(val_fraction=cfg.val_fraction, test_fraction=cfg.test_fraction, seed=cfg.split_seed,
                              **({"split_file": cfg.split_file} if cfg.split_file else {}),
                              **({"folds": cfg.folds, "fold": cfg.fold} if cfg.folds else {}))
    intensity, geometry = intensity_config(cfg), geometry_config(cfg)
    train_cases = source.load_all(split.train)
    val_cases = source.load_all(split.val) if split.val else []
    mix_error, _ = channel_mix([(c.source or c.id, c.num_channels, c.is_2d) for c in train_cases + val_cases])
    if mix_error:  # the same rule as `samadapt data check`
        raise InputError(cfg.path, mix_error)
    train = SliceDataset(train_cases, input_size, axis=cfg.axis, intensity=intensity,
                         augment=None if cfg.augment == "none" else cfg.augment, empty_ratio=cfg.empty_ratio,
                         seed=seed, geometry=geometry)
    if cfg.fewshot is not None:
        train = train.restrict(fewshot_slices(train.slice_keys, cfg.fewshot, seed=seed))
    val = None
    if val_cases:
        val = SliceDataset(val_cases, input_size, axis=cfg.axis, intensity=intensity, empty_ratio=None,
                           geometry=geometry)
    return PreparedData(source, split, train, val, intensity, dataset_fingerprint(train_cases + val_cases))


def use_cache(method: Method, cfg: DataConfig) -> bool:
    """Whether training reads encoder outputs from the embedding cache."""
    possible = method.uses_backbone and not method.needs_encoder_grad
    if cfg.cache == "off":
        return False
    if cfg.cache == "on":
        if not possible:
            raise ConfigError(f"data.cache=on, but method {method.name!r} trains through the encoder or has none")
        if cfg.augment != "none":
            raise ConfigError("data.cache=on cannot be combined with image-space augmentation (data.augment)")
        return True
    return possible and cfg.augment == "none"


def embedding_cache(backbone: Backbone, method: Method, cfg: DataConfig):
    """The ``EmbeddingCache`` this run reads encoder outputs from, or None when not caching."""
    if not use_cache(method, cfg):
        return None
    from .embedding_cache import EmbeddingCache
    from ..backbones.weights import cache_dir

    root = Path(cfg.cache_dir) if cfg.cache_dir else cache_dir() / "embeddings"
    return EmbeddingCache(root, backbone, intermediates=method.intermediates)


def feature_source(backbone: Backbone, method: Method, cfg: DataConfig, device: torch.device):
    """A function batch -> cached ``Features`` (computed on first use), or None when not caching."""
    cache = embedding_cache(backbone, method, cfg)
    if cache is None:
        return None

    def fetch(batch: dict):
        return cache.get_or_compute(batch["key"], batch["image"]).to(device, torch.float32)

    fetch.cache = cache  # type: ignore[attr-defined]
    return fetch


def build_model(config: RunConfig, num_classes: int, device: torch.device,
                backbone: Backbone | None = None) -> tuple[Backbone, Method]:
    """Build the backbone (unless given) and the method, seeded so that initialisation is reproducible."""
    spec = config.backbone
    backbone = backbone or build_backbone(spec.name, checkpoint=spec.checkpoint, input_size=spec.input_size,
                                          normalization=spec.normalization)
    torch.manual_seed(config.train.seed)
    method = build_method(config.method.name, backbone, config.method.options, num_classes)
    return backbone, method.to(device)


def run_manifest(config: RunConfig, backbone: Backbone, method: Method, data: PreparedData | None,
                 device: torch.device, **extra: Any) -> dict[str, Any]:
    return base_manifest(
        method={"name": config.method.name, "options": config.method.options,
                "one_vs_rest": type(method).__name__ == "OneVsRest", "num_classes": method.num_classes,
                "trainable_parameters": sum(p.numel() for _, p in method.trainable_parameters())},
        backbone=backbone.describe(),
        data=None if data is None else {"source": data.source.describe(), "split": data.split.to_dict(),
                                        "fingerprint": data.fingerprint, "train_slices": len(data.train),
                                        "val_slices": len(data.val) if data.val else 0},
        config=config.to_dict(), seed=config.train.seed, device=str(device), world_size=dist_utils.world_size(),
        **extra,
    )


#: Settings that may differ on ``--resume`` without changing what is computed.
RESUME_FREE_KEYS = ("output", "train.device", "train.threads", "train.num_workers", "train.reuse_memory",
                    "data.cache_dir")


def _flat(values: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(values, dict) and values:
        return {k: v for key, sub in values.items() for k, v in _flat(sub, f"{prefix}{key}.").items()}
    return {prefix[:-1]: list(values) if isinstance(values, tuple) else values}


def config_differences(old: RunConfig, new: RunConfig) -> list[str]:
    """``key: old -> new`` for each setting (outside ``RESUME_FREE_KEYS``) that differs."""
    a, b = _flat(yaml.safe_load(yaml.safe_dump(old.to_dict()))), _flat(yaml.safe_load(yaml.safe_dump(new.to_dict())))
    keys = sorted((set(a) | set(b)) - set(RESUME_FREE_KEYS))
    return [f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in keys if a.get(k) != b.get(k)]


def data_differences(old: dict[str, Any] | None, new: dict[str, Any]) -> list[str]:
    """What differs between the data section of the run's manifest and this run's: split, content."""
    old = old or {}
    out = [f"data.split.{part}: {len(old.get('split', {}).get(part, []))} case(s) -> {len(new['split'][part])}"
           + ("" if len(old.get("split", {}).get(part, [])) != len(new["split"][part]) else " (other cases)")
           for part in ("train", "val", "test") if old.get("split", {}).get(part) != new["split"][part]]
    if old.get("fingerprint") != new["fingerprint"]:
        out.append(f"data content: fingerprint {str(old.get('fingerprint'))[:12]} -> {new['fingerprint'][:12]}")
    return out


def check_target(run: RunDir, config: Any, previous: Callable[[], Any], resume: bool, overwrite: bool,
                 allow_changes: bool, unit: str = "epoch") -> None:
    """Refuse to train ``config`` into ``run`` unless it is new, or ``resume`` (with the run's configuration,
    ``previous()``, unless ``allow_changes``) / ``overwrite`` says what to do with its run; ``unit`` names what
    ``run.trained_epochs()`` counts (2D epochs, 3D rounds)."""
    if resume and overwrite:
        raise ConfigError("--resume and --overwrite exclude each other")
    trained = run.trained_epochs()
    if resume:
        if not run.path.is_dir():
            raise InputError(run.path, "no such run folder to resume")
        if trained is None:
            raise InputError(run.state, f"no trained {unit} to resume from (train without --resume)")
        changed = config_differences(previous(), config)
        if changed and not allow_changes:
            raise ConfigError(f"{run.path}: --resume with a configuration that differs from the run's: "
                              f"{'; '.join(changed)}. Pass --allow-changes to resume anyway, or --overwrite")
    elif trained is not None and not overwrite:
        raise InputError(run.path, f"already holds a trained run ({trained} {unit}(s)); pass --resume to continue "
                                   "it or --overwrite to replace it")


def train(config: RunConfig, resume: bool = False, overwrite: bool = False,
          allow_changes: bool = False) -> TrainResult | None:
    """Train ``config``'s method into ``config.output``; returns None for methods with nothing to train.

    ``resume`` continues the run in the folder (refusing another configuration or dataset unless
    ``allow_changes``); ``overwrite`` replaces the run a folder holds; a folder holding a trained run needs one of
    them. The folder is locked while training."""
    check_config(config)
    out = check_output_dir(config.output)
    run = RunDir(out)
    check_target(run, config, run.config, resume, overwrite, allow_changes)
    device = dist_utils.local_device(resolve_device(config.train.device))
    if config.train.threads:
        torch.set_num_threads(config.train.threads)
    dist_utils.init_distributed(device)
    source = open_source(config.data)
    backbone, method = build_model(config, source.num_classes, device)
    data = prepare_data(config.data, method.input_size, seed=config.train.seed, source=source)
    if data.val is None and method.trainable and (config.data.val_fraction > 0 or config.data.split_file):
        raise InputError(config.data.path, f"no validation case: the split of {len(source.case_ids)} labelled "
                                           "case(s) leaves none; add cases, give data.split_file, or set "
                                           "data.val_fraction=0 to train without validation (last epoch kept)")
    manifest = run_manifest(config, backbone, method, data, device)
    if resume:
        previous = run.manifest
        changed = data_differences(previous.get("data"), manifest["data"])
        if changed and not allow_changes:
            raise InputError(config.data.path, f"--resume on data that differs from the run's in {out}: "
                                               f"{'; '.join(changed)}. Pass --allow-changes to resume anyway")
        changed += config_differences(run.config(), config)
        if changed:
            manifest["resumed_with_changes"] = changed
    lock = FolderLock(out) if dist_utils.is_main() else None
    try:
        if lock is not None:
            lock.acquire()
            check_target(run, config, run.config, resume, overwrite, allow_changes)  # again, no one else writes now
            clean_stale_parts(out)
            if overwrite:
                for path in run.outputs:
                    shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
            save_config(config, run.config_yaml)
            atomic_write_json(run.manifest_json, manifest)
        if not method.trainable:
            return None
        if data.val is None and dist_utils.is_main():
            from .trainer import console

            console.print("no validation split (data.val_fraction=0): the last epoch is kept as best")
        features = feature_source(backbone, method, config.data, device)
        if features is not None:  # encode every slice once up front, so the time budget counts training only
            entries = 0
            for ds in (data.train, data.val):
                if ds is not None and len(ds):
                    entries += features.cache.precompute(ds, batch_size=config.train.batch_size,
                                                         progress=dist_utils.is_main())[0]
            if dist_utils.is_main():
                from .trainer import console

                console.print(features.cache.summary(entries))
        fixed = method.set_fixed_inputs(config.data.augment == "none")  # e.g. reuse of a frozen encoder prefix
        warning = method.backbone_note()
        if dist_utils.is_main():
            from .trainer import console

            for note in (fixed, warning and f"[yellow]warning:[/] {warning}"):
                if note:
                    console.print(note)
        trainer = Trainer(method, config.train, out, manifest, device, collate=collate, feature_source=features)
        try:
            result = trainer.fit(data.train, data.val, resume=resume)
        finally:
            method.set_fixed_inputs(False)
        if dist_utils.is_main():
            best = None if math.isnan(result.best_metric) else result.best_metric
            manifest["training"] = {"epochs_run": len(result.history), "best_val_dice": best,
                                    "seconds": result.seconds, "stopped_early": result.stopped_early}
            atomic_write_json(run.manifest_json, manifest)
    finally:
        if lock is not None:
            lock.release()
    dist_utils.cleanup()
    return result
