"""Reports people look at: a metrics table (Markdown, CSV, JSON), training curves and prediction overlays (PNG)."""

from __future__ import annotations

import csv
import io
import math
from pathlib import Path
from typing import Any, Mapping, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from ..io_utils import atomic_path, atomic_write_json, atomic_write_text  # noqa: E402

METRIC_ORDER = ("dice", "iou", "hd95", "hd95_vox", "nsd", "assd")
"""Reported metrics (:mod:`samadapt.evaluation.metrics`): HD95 in mm and, for published tables, in voxels."""


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return "n/a" if math.isnan(value) else f"{value:.3f}"
    return str(value)


def metrics_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str]) -> str:
    """A Markdown table of ``rows`` (dicts) over ``columns``."""
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        lines.append("| " + " | ".join(_fmt(row.get(c, "")) for c in columns) + " |")
    return "\n".join(lines)


def write_metrics(rows: Sequence[Mapping[str, Any]], columns: Sequence[str], out_dir: Path) -> None:
    """``metrics.csv``, ``metrics.json`` and ``metrics.md`` in ``out_dir``."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(columns), extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(out_dir / "metrics.csv", buf.getvalue())
    atomic_write_json(out_dir / "metrics.json", list(rows))
    atomic_write_text(out_dir / "metrics.md", metrics_table(rows, columns) + "\n")


def _save(fig, path: Path) -> Path:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def plot_training_curves(histories: Mapping[str, Sequence[Mapping[str, Any]]], path: Path) -> Path:
    """Train loss and validation Dice, one line per run, against optimizer steps when every run records them
    (runs with other batch counts per epoch line up), else epochs; validations joined across the epochs between."""
    fig, (ax_loss, ax_dice) = plt.subplots(1, 2, figsize=(10, 3.6))
    axis = "steps" if all("steps" in h for history in histories.values() for h in history) else "epoch"
    for name, history in histories.items():
        x = [h[axis] for h in history]
        line, = ax_loss.plot(x, [h["train_loss"] for h in history], marker=".", label=name)
        scored = [(xi, h["val_dice"]) for xi, h in zip(x, history) if not np.isnan(h.get("val_dice", np.nan))]
        if scored:
            ax_dice.plot(*zip(*scored), marker=".", color=line.get_color(), label=name)
    label = "optimizer step" if axis == "steps" else "epoch"
    ax_loss.set(xlabel=label, ylabel="training loss", title="training loss")
    ax_dice.set(xlabel=label, ylabel="Dice", title="validation Dice", ylim=(0, 1))
    for ax in (ax_loss, ax_dice):
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=8)
    return _save(fig, path)


def plot_overlays(image: np.ndarray, truth: np.ndarray, predictions: Mapping[str, np.ndarray],
                  slices: Sequence[int], path: Path, axis: int = 0) -> Path:
    """Grid of test slices (rows) x methods (columns): image, ground-truth contour (green), prediction (red).

    image, truth and each prediction: Z x Y x X arrays of one case; ``slices`` index ``axis``.
    """
    names = list(predictions)
    fig, axes = plt.subplots(len(slices), len(names), figsize=(2.6 * len(names), 2.6 * len(slices)), squeeze=False)
    for r, s in enumerate(slices):
        img = np.take(image, s, axis=axis)
        gt = np.take(truth, s, axis=axis)
        for c, name in enumerate(names):
            ax = axes[r][c]
            ax.imshow(np.flipud(img), cmap="gray")
            if gt.any():
                ax.contour(np.flipud(gt > 0), levels=[0.5], colors="lime", linewidths=0.8)
            pred = np.take(predictions[name], s, axis=axis)
            if pred.any():
                ax.contour(np.flipud(pred > 0), levels=[0.5], colors="red", linewidths=0.8)
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(name, fontsize=9)
            if c == 0:
                ax.set_ylabel(f"slice {s}", fontsize=8)
    fig.suptitle("green: ground truth, red: prediction", fontsize=9)
    return _save(fig, path)
