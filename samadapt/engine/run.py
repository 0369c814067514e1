"""From a ``RunConfig`` to a trained, evaluated run folder: the Python API behind ``samadapt train``.

Run folder layout (``config.output``)::

    config.yaml            the full resolved configuration
    manifest.json          versions, commit, backbone id + weights hash, split, seed, device, metrics
    checkpoints/best.*     adapter-only weights chosen on the validation split (never the test split)
    checkpoints/last.*     the last epoch's weights; state.pt: what --resume needs
    log.csv, tensorboard/  training curves
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..backbones import Backbone, build_backbone
from ..data.preprocessing import IntensityConfig
from ..data.readers import open_dataset
from ..data.slices import SliceDataset, collate
from ..data.splits import fewshot_slices
from ..errors import ConfigError
from ..io_utils import atomic_write_json
from ..methods import Method, build_method
from . import distributed as dist_utils
from .config import DataConfig, RunConfig, save_config
from .device import resolve_device
from .manifest import base_manifest
from .trainer import Trainer, TrainResult


@dataclass
class PreparedData:
    source: Any
    split: Any
    train: SliceDataset
    val: SliceDataset | None
    intensity: IntensityConfig


def intensity_config(cfg: DataConfig) -> IntensityConfig:
    return IntensityConfig(mode=cfg.intensity_mode, window=cfg.window, window_min=cfg.window_min,
                           window_max=cfg.window_max, percentiles=tuple(cfg.percentiles))


def open_source(cfg: DataConfig):
    if not cfg.path:
        raise ConfigError("data.path is not set: point it at an nnU-Net raw dataset or a 2D images/masks folder")
    return open_dataset(cfg.path, cfg.format)


def prepare_data(cfg: DataConfig, input_size: int, seed: int = 0, source: Any = None) -> PreparedData:
    """Split the dataset by case and build the training/validation slice datasets."""
    source = source or open_source(cfg)
    split = source.make_split(val_fraction=cfg.val_fraction, test_fraction=cfg.test_fraction, seed=cfg.split_seed,
                              **({"split_file": cfg.split_file} if cfg.split_file else {}),
                              **({"folds": cfg.folds, "fold": cfg.fold} if cfg.folds else {}))
    intensity = intensity_config(cfg)
    train = SliceDataset(source.load_all(split.train), input_size, axis=cfg.axis, intensity=intensity,
                         augment=None if cfg.augment == "none" else cfg.augment, empty_ratio=cfg.empty_ratio,
                         seed=seed)
    if cfg.fewshot is not None:
        train = train.restrict(fewshot_slices(train.slice_keys, cfg.fewshot, seed=seed))
    val = None
    if split.val:
        val = SliceDataset(source.load_all(split.val), input_size, axis=cfg.axis, intensity=intensity,
                           empty_ratio=None)
    return PreparedData(source, split, train, val, intensity)


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
    from ..data.cache import EmbeddingCache
    from ..weights import cache_dir

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
                                        "train_slices": len(data.train),
                                        "val_slices": len(data.val) if data.val else 0},
        config=config.to_dict(), seed=config.train.seed, device=str(device), world_size=dist_utils.world_size(),
        **extra,
    )


def train(config: RunConfig, resume: bool = False) -> TrainResult | None:
    """Train ``config``'s method; returns None for methods with nothing to train (zero-shot baselines)."""
    device = dist_utils.local_device(resolve_device(config.train.device))
    if config.train.threads:
        torch.set_num_threads(config.train.threads)
    dist_utils.init_distributed(device)
    out = Path(config.output)
    source = open_source(config.data)
    backbone, method = build_model(config, source.num_classes, device)
    data = prepare_data(config.data, method.input_size, seed=config.train.seed, source=source)
    manifest = run_manifest(config, backbone, method, data, device)
    if dist_utils.is_main():
        out.mkdir(parents=True, exist_ok=True)
        save_config(config, out / "config.yaml")
        atomic_write_json(out / "manifest.json", manifest)
    if not method.trainable:
        return None
    features = feature_source(backbone, method, config.data, device)
    if features is not None:  # encode every slice once up front, so the time budget counts training only
        for ds in (data.train, data.val):
            if ds is not None and len(ds):
                features.cache.precompute(ds, batch_size=config.train.batch_size, progress=dist_utils.is_main())
    trainer = Trainer(method, config.train, out, manifest, device, collate=collate, feature_source=features)
    result = trainer.fit(data.train, data.val, resume=resume)
    if dist_utils.is_main():
        manifest["training"] = {"epochs_run": len(result.history), "best_val_dice": result.best_metric,
                                "seconds": result.seconds, "stopped_early": result.stopped_early}
        atomic_write_json(out / "manifest.json", manifest)
    dist_utils.cleanup()
    return result
