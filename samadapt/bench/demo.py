"""The demo: MNI152 brain extraction on the bundled LiteMedSAM, a trained method against the baselines.

Steps: build the dataset (three non-overlapping axial slabs of the MNI152 T1 template: train / val / test),
train METHOD (frozen encoder, cached embeddings) and the ``unet`` baseline within a time budget each, run the
zero-shot ``box-prompt`` baselines (oracle ground-truth box and whole-image box), evaluate everything on the test
slab in 3D (Dice, IoU, HD95/NSD in mm), and write ``report/``: metrics table, training curves, overlays.
"""

from __future__ import annotations

from pathlib import Path

from rich.console import Console

from ..evaluation.compare import ModelSpec, compare
from ..data.demo_data import DEMO_DATASETS
from .selection import preset

console = Console(stderr=True)


def _dataset(out: Path) -> Path:
    """The MNI152 brain dataset inside ``out/data`` (built once, reused by later runs)."""
    return Path(DEMO_DATASETS["mni152-brain"](out / "data" / "mni152-brain"))


def run_demo(out: Path, method: str = "decoder", minutes: float = 4.0, threads: int | None = None,
             baselines: bool = True) -> list[dict]:
    """Run the whole demo into ``out``; returns the per-case metrics rows (one per model and class).

    ``baselines=False`` trains and evaluates ``method`` alone (no unet, no box-prompt).
    """
    models = [ModelSpec(method, preset(method))]
    if baselines:
        if method != "unet":
            models.append(ModelSpec("unet", preset("unet")))
        models += [ModelSpec("box-prompt-gt", preset("box-prompt", "oracle")),
                   ModelSpec("box-prompt-whole", preset("box-prompt"))]
    data_path = _dataset(out)
    console.print(f"[bold]dataset[/] {data_path}")
    return compare(data_path, models, out, minutes=minutes, threads=threads,
                   title=f"samadapt demo: MNI152 brain extraction on LiteMedSAM ({method}, at most {minutes:g} min "
                         "training per model)")
