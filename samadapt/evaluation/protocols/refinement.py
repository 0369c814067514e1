"""M-SAM refinement curves: Dice after every iteration, automatic and with simulated clicks, and their plot.

``slice_curve`` pools Dice over 2D items in the method's S x S frame (fast; any ``SliceDataset``).
``case_curves`` scores whole cases in their own geometry: per iteration, the slices' probabilities are reassembled
into the case's volume (as ``Predictor.predict_case`` does) and scored in 3D with ``samadapt.evaluation.metrics``.
``plot_refinement_curves`` draws Dice against the iteration, one line per mode, baselines as horizontal lines.

Modes: ``auto`` = ``predict`` without clicks (mask-only refinement from ``auto_start``); ``simulate`` = one
corrective click per iteration from the error region of the previous prediction against the ground truth
(``eval_click_mode``, deterministic ``center`` by default), so iteration n is the "Dice after n clicks".

:func:`evaluate_refinement` is the protocol (``samadapt evaluate refinement``): it scores a trained checkpoint on
the dataset's test split (or the given cases) and writes ``OUT/refinement.json``, ``OUT/refinement.md`` and
``OUT/refinement_curve.png``::

    samadapt evaluate refinement --checkpoint RUN --data DATASET \\
        --iterations 5 --out DIR [--baseline "decoder=0.91" ...]
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import torch

from ...methods.base import upsample_to
from ...overlap import dice_from_counts, mask_counts

MODES = ("auto", "simulate")
MODE_LABELS = {"auto": "automatic (no clicks)", "simulate": "interactive (simulated clicks)"}


def _batches(items: Sequence[dict], batch_size: int) -> Iterable[dict]:
    from ...data.slices import collate

    for start in range(0, len(items), batch_size):
        yield collate([items[i] for i in range(start, min(start + batch_size, len(items)))])


@torch.inference_mode()
def iteration_probabilities(method, items: Sequence[dict], iterations: int, modes: Sequence[str] | str = MODES,
                            batch_size: int = 4, device: torch.device | str = "cpu"
                            ) -> dict[str, list[list[torch.Tensor]]]:
    """Foreground probability S x S (float16, CPU) of every item after every iteration: ``{mode: [iteration][item]}``.

    ``items`` follow the batch convention per item (``image``, and ``label`` for ``"simulate"``). The encoder runs
    once per batch and its embedding is shared by the modes.
    """
    modes = [modes] if isinstance(modes, str) else list(modes)
    bad = [m for m in modes if m not in MODES]
    if bad:
        raise ValueError(f"modes must be among {MODES}, got {bad}")
    method.eval()
    out = {m: [[] for _ in range(iterations)] for m in modes}
    for batch in _batches(items, batch_size):
        batch = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}
        batch.pop("points", None)
        embedding = method.embed(batch)
        for mode in modes:
            logits = method.refine(batch, iterations, mode, embedding=embedding,
                                   click_mode=method.config.eval_click_mode)
            for t, lo in enumerate(logits):
                fg = torch.sigmoid(upsample_to(lo.float(), method.input_size))[:, 0]
                out[mode][t].extend(fg.to("cpu", torch.float16))
    return out


def pooled_dice(fg_probs: Sequence[torch.Tensor], labels: Sequence[torch.Tensor]) -> float:
    """Dice of ``prob > 0.5`` against ``label > 0`` with counts pooled over all items (1.0 when both are empty)."""
    counts = sum(mask_counts(p.float() > 0.5, g > 0) for p, g in zip(fg_probs, labels))
    return float(dice_from_counts(counts))


def slice_curve(method, items: Sequence[dict], iterations: int, mode: str, batch_size: int = 4,
                device: torch.device | str = "cpu") -> list[float]:
    """Pooled Dice (S x S frame) after each of ``iterations`` iterations over labelled ``items``."""
    probs = iteration_probabilities(method, items, iterations, mode, batch_size, device)[mode]
    labels = [items[i]["label"] for i in range(len(items))]
    return [pooled_dice(p, labels) for p in probs]


def case_curves(method, case, iterations: int, modes: Sequence[str] = MODES, axis: int = 0, intensity=None,
                batch_size: int = 4, device: torch.device | str = "cpu", geometry=None) -> dict[str, list[float]]:
    """3D Dice of ``case`` (in its own geometry) after each iteration, per mode: ``{mode: [dice_1, ...]}``.
    ``geometry``: the slices' resize route (``preprocessing.Geometry``; None = SAM's longest side + padding)."""
    from ...data.preprocessing import LONGEST, IntensityConfig
    from ...data.slices import reassemble, volume_slices
    from ..metrics import compute_metrics

    if case.label is None:
        raise ValueError(f"case {case.id} has no label to score against")
    geometry = geometry or LONGEST
    slices = volume_slices(case, axis, method.input_size, intensity or IntensityConfig(), geometry)
    items = [slices[i] for i in range(len(slices))]
    curves: dict[str, list[float]] = {}
    probs_by_mode = iteration_probabilities(method, items, iterations, modes, batch_size, device)
    for mode in modes:
        per_iter = probs_by_mode[mode]
        dices = []
        for fg in per_iter:
            probs = [torch.stack([1 - p.float(), p.float()]) for p in fg]
            pred = reassemble(probs, axis, case, geometry=geometry)
            dices.append(compute_metrics(pred, case.label, classes=[1], spacing=case.spacing,
                                         metrics=("dice",))[1]["dice"])
        curves[mode] = dices
    return curves


def plot_refinement_curves(curves: Mapping[str, Sequence[float]], path: str | Path,
                           baselines: Mapping[str, float] | None = None, title: str = "M-SAM refinement",
                           ylabel: str = "Dice") -> Path:
    """Dice after each iteration (x = 1..n), one line per entry of ``curves``, baselines as dashed lines; a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ...io_utils import atomic_path

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(6, 4))
    n_max = 1
    for name, values in curves.items():
        xs = list(range(1, len(values) + 1))
        n_max = max(n_max, len(values))
        ax.plot(xs, list(values), marker="o", label=MODE_LABELS.get(name, name))
    for i, (name, value) in enumerate((baselines or {}).items()):
        ax.axhline(float(value), linestyle="--", linewidth=1, color=f"C{len(curves) + i}", label=name)
    ax.set_xlabel("iteration (= number of clicks in the interactive mode)")
    ax.set_ylabel(ylabel)
    ax.set_xticks(list(range(1, n_max + 1)))
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def refinement_markdown(result: Mapping[str, Any]) -> str:
    """The report of :func:`evaluate_refinement`'s ``result``: mean Dice per mode and iteration, as a Markdown table."""
    n = result["iterations"]
    lines = [f"# M-SAM refinement curve ({', '.join(result['cases'])})", "",
             f"checkpoint: `{result['checkpoint']}`; 3D Dice on each case's own grid after each iteration, "
             "averaged over cases.", "",
             "| mode | " + " | ".join(f"it {t}" for t in range(1, n + 1)) + " |",
             "|---|" + "---|" * n]
    for mode, values in result["mean"].items():
        lines.append(f"| {MODE_LABELS.get(mode, mode)} | " + " | ".join(f"{v:.4f}" for v in values) + " |")
    if result.get("baselines"):
        lines += ["", "Baselines (given on the command line): "
                  + ", ".join(f"{k} {v:.4f}" for k, v in result["baselines"].items())]
    lines += ["", f"time: {result['seconds']:.0f} s", "", "![refinement curve](refinement_curve.png)", ""]
    return "\n".join(lines)


def evaluate_refinement(checkpoint: str | os.PathLike, data: str | os.PathLike, out: str | os.PathLike, *,
                        cases: Sequence[str] | None = None, iterations: int = 5, modes: Sequence[str] = MODES,
                        batch_size: int = 4, baselines: Mapping[str, float] | None = None,
                        device: str = "cpu") -> dict[str, Any]:
    """Refinement curves of a trained msam ``checkpoint`` (a run folder or a checkpoint file) on ``data``'s test
    split (or ``cases``).

    Returns ``{"checkpoint", "data", "cases", "iterations", "per_case": {case: {mode: [dice_1, ...]}},
    "mean": {mode: [dice_1, ...]} (over cases), "baselines", "seconds"}`` (one value per iteration) and writes it to
    ``out/refinement.json``, with ``out/refinement.md`` (:func:`refinement_markdown`) and ``out/refinement_curve.png``
    (each atomically). ``baselines`` ({name: Dice}) are drawn as horizontal lines.
    """
    from ...data.readers import open_dataset
    from ...engine.predict import Predictor
    from ...errors import ConfigError
    from ...io_utils import atomic_write_json, atomic_write_text

    bad = [m for m in modes if m not in MODES]
    if bad or not modes:
        raise ConfigError(f"refinement modes must be among {MODES}, got {list(modes)}")
    if iterations < 1:
        raise ConfigError(f"refinement iterations must be >= 1, got {iterations}")
    t0 = time.time()
    predictor = Predictor.from_run(checkpoint, device=device)
    method = predictor.method
    if not hasattr(method, "refine"):
        raise ConfigError(f"{checkpoint}: method {method.name!r} has no refinement iterations (train msam)")
    source = open_dataset(data)
    cases = list(cases or source.make_split().test)
    modes = list(modes)
    per_case = {}
    for case_id in cases:
        case = source.load(case_id)
        per_case[case_id] = case_curves(method, case, iterations, modes, predictor.axis, predictor.intensity,
                                        batch_size, predictor.device, predictor.geometry)
    mean = {m: [float(np.mean([per_case[c][m][t] for c in cases])) for t in range(iterations)] for m in modes}
    out = Path(out)
    result = {"checkpoint": str(checkpoint), "data": str(data), "cases": cases, "iterations": iterations,
              "per_case": per_case, "mean": mean, "baselines": dict(baselines or {}), "seconds": time.time() - t0}
    atomic_write_json(out / "refinement.json", result)
    plot_refinement_curves(mean, out / "refinement_curve.png", result["baselines"],
                           title=f"M-SAM refinement, {', '.join(cases)} (3D Dice)")
    atomic_write_text(out / "refinement.md", refinement_markdown(result))
    return result
