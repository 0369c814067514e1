"""The run folder of ``samadapt train``: where each of its files lives and what it says (the one module that
spells the layout)::

    config.yaml            the full resolved configuration
    manifest.json          versions, commit, backbone id + weights hash, split, seed, device, metrics; ``training``
                           once training finished
    checkpoints/best.*     adapter-only weights (.safetensors) and their manifest (.json) chosen on validation
    checkpoints/last.*     the last epoch's weights and manifest
    state.pt               what ``--resume`` needs: the last committed epoch
    log.csv, tensorboard/  training curves
    .lock                  held by the process writing the folder (``samadapt.io_utils.FolderLock``)

A user names a trained model by its run folder or by a checkpoint file; :func:`resolve_checkpoint` turns either
into the checkpoint to load and :func:`checkpoint_config` reads back the configuration it was trained with.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any

from ..config.run_config import RunConfig, load_config
from ..errors import CheckpointError, InputError
from .checkpoint import load_training_state, read_manifest


class RunDir:
    """The paths of the run folder ``path`` and readers of what they hold (the folder need not exist yet)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r})"

    @property
    def checkpoints(self) -> Path:
        return self.path / "checkpoints"

    @property
    def best_checkpoint(self) -> Path:
        return self.checkpoints / "best.safetensors"

    @property
    def last_checkpoint(self) -> Path:
        return self.checkpoints / "last.safetensors"

    @property
    def state(self) -> Path:
        return self.path / "state.pt"

    @property
    def log_csv(self) -> Path:
        return self.path / "log.csv"

    @property
    def tensorboard(self) -> Path:
        return self.path / "tensorboard"

    @property
    def manifest_json(self) -> Path:
        return self.path / "manifest.json"

    @property
    def config_yaml(self) -> Path:
        return self.path / "config.yaml"

    @property
    def outputs(self) -> tuple[Path, ...]:
        """Everything a run writes into the folder (what ``--overwrite`` removes; the lock stays)."""
        return (self.checkpoints, self.tensorboard, self.state, self.log_csv, self.manifest_json, self.config_yaml)

    @property
    def manifest(self) -> dict[str, Any]:
        """``manifest.json`` as a dict; ``{}`` while the run has not written a readable one."""
        try:
            loaded = json.loads(self.manifest_json.read_text())
        except (OSError, ValueError):
            return {}
        return loaded if isinstance(loaded, dict) else {}

    def config(self) -> RunConfig:
        """The run's configuration (``config.yaml``); ``InputError`` naming the file when it is missing."""
        if not self.config_yaml.is_file():
            raise InputError(self.config_yaml, "missing: cannot tell which configuration the run used")
        return load_config(self.config_yaml)

    def trained_epochs(self) -> int | None:
        """Epochs committed in ``state.pt`` (None when the folder holds no trained epoch)."""
        if not self.state.is_file():
            return None
        return int(load_training_state(self.state)["epoch"]) + 1

    def is_trained(self) -> bool:
        """Whether training finished: a best checkpoint, and a manifest that records the training."""
        return self.best_checkpoint.is_file() and "training" in self.manifest

    def history(self) -> list[dict[str, float]]:
        """The rows of ``log.csv`` (one per epoch; empty cells NaN); ``[]`` before the first epoch."""
        if not self.log_csv.is_file():
            return []
        with self.log_csv.open() as handle:
            return [{k: float(v) if v not in ("", None) else math.nan for k, v in row.items()}
                    for row in csv.DictReader(handle)]

    def checkpoint(self, or_last: bool = False) -> Path:
        """The best checkpoint (``or_last``: the last one when there is no best); ``CheckpointError`` naming the
        folder when there is none."""
        for candidate in (self.best_checkpoint, self.last_checkpoint) if or_last else (self.best_checkpoint,):
            if candidate.is_file():
                return candidate
        raise CheckpointError(f"{self.path}: no checkpoints/best.safetensors (is it a run folder of `samadapt "
                              "train`?)")


def resolve_checkpoint(path: str | Path, or_last: bool = False) -> Path:
    """The checkpoint a user means by ``path``: a run folder's best checkpoint (see ``RunDir.checkpoint``), or the
    ``.safetensors`` file ``path`` names (with or without the suffix, or its ``.json`` manifest). A path that names
    neither raises ``CheckpointError`` naming it."""
    path = Path(path)
    if path.is_dir():
        return RunDir(path).checkpoint(or_last)
    weights = path.with_suffix(".safetensors")
    if weights.is_file():
        return weights
    if path.suffix in (".safetensors", ".json"):
        raise CheckpointError(f"{weights}: checkpoint file not found")
    raise CheckpointError(f"{path}: no checkpoints/best.safetensors: not a run folder of `samadapt train`, nor a "
                          "checkpoint file")


def checkpoint_config(checkpoint: str | Path) -> tuple[RunConfig, dict[str, Any]]:
    """The configuration a checkpoint was trained with, and its whole manifest; ``CheckpointError`` when the
    manifest holds no run config (a checkpoint not written by ``samadapt train``)."""
    manifest = read_manifest(checkpoint)
    if "config" not in manifest:
        raise CheckpointError(f"{checkpoint}: manifest has no run config; was it written by samadapt train?")
    return RunConfig.from_dict(manifest["config"]), manifest
