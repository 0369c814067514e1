"""Scores of a trained model on a test case, kept beside a comparison so that it is scored once.

A comparison (``samadapt compare``, the benchmark's accuracy part) scores every model on every test case; with
the store, a model already scored on a case (same weights, same scoring options, same case contents) is not
predicted again. So an interrupted comparison keeps what it measured, and comparisons run in parallel on
disjoint ``--models`` subsets in one output folder are combined by one more run over all of them at the cost
of reading files.

An entry lives in ``OUT/scores/<label>/seed<N>/<key>.json`` (the per-class metric rows and the prediction's
seconds) with ``<key>.npz`` (the predicted label volume, D x H x W uint8, for the report's overlays). The key is
the SHA-256 of the model's weights digest (or, for a zero-shot model, its resolved config), its scoring overrides,
the metric names and the case's test set, id, image and label bytes.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ..engine.checkpoint import weights_fingerprint
from ..io_utils import atomic_path, atomic_write_json


def model_fingerprint(checkpoint: Path | None, config: Any = None) -> str:
    """What the predictions of a model depend on: its checkpoint's weights (``weights_fingerprint``), or for an
    untrained model its resolved config (any JSON-able value)."""
    if checkpoint is None:
        return "config:" + json.dumps(config, sort_keys=True, default=str)
    return "weights:" + weights_fingerprint(checkpoint)


def case_key(fingerprint: str, overrides: Sequence[str], metrics: Sequence[str], test_set: str, case) -> str:
    """The entry's key for ``case`` (``id``, ``image`` C x D x H x W, ``label`` D x H x W) scored by a model."""
    h = hashlib.sha256()
    for part in (fingerprint, " ".join(overrides), ",".join(metrics), test_set, case.id):
        h.update(part.encode() + b"\0")
    for array in (case.image, case.label):
        a = np.ascontiguousarray(array)
        h.update(f"{a.dtype}{a.shape}".encode())
        h.update(a.tobytes())
    return h.hexdigest()[:32]


class ScoreStore:
    """The scores of one model label and seed: ``get(key)`` / ``put(key, ...)``."""

    def __init__(self, root: Path, label: str, seed: int):
        self.folder = Path(root) / label / f"seed{seed}"

    def get(self, key: str) -> tuple[np.ndarray, list[dict], float] | None:
        """(prediction, per-class score rows, prediction seconds), or None when not stored (or unreadable)."""
        meta, pred = self.folder / f"{key}.json", self.folder / f"{key}.npz"
        if not (meta.is_file() and pred.is_file()):
            return None
        try:
            entry = json.loads(meta.read_text())
            with np.load(pred) as data:
                prediction = data["prediction"]
        except (OSError, ValueError, KeyError):
            return None  # a damaged entry is scored again
        return prediction, entry["scores"], float(entry["seconds"])

    def put(self, key: str, prediction: np.ndarray, scores: list[dict], seconds: float) -> None:
        """Store an entry (prediction first, so a present ``.json`` always has its ``.npz``)."""
        with atomic_path(self.folder / f"{key}.npz") as tmp:
            with open(tmp, "wb") as f:
                np.savez_compressed(f, prediction=np.asarray(prediction, dtype=np.uint8))
        atomic_write_json(self.folder / f"{key}.json", {"scores": scores, "seconds": seconds})
