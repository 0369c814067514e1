"""The demo: few-label MNI152 tissue segmentation on the bundled LiteMedSAM, scored on the source test slab and under
a simulated scanner shift, a trained method against the baselines.

Steps: build the 3-class tissue dataset (three non-overlapping axial slabs of the MNI152 T1 template: train / val /
test) and the same test slab under a bias field (``mni152-tissue-bias``); train METHOD (frozen encoder, cached
embeddings) and the ``unet`` baseline on 10 % of the training slices (9 slices: the few-label setting where a
foundation model's prior is meant to matter) until validation Dice stops improving (the benchmark's convergence
budget); run the zero-shot oracle-box ``box-prompt`` baseline; evaluate everything in 3D (Dice, IoU, HD95/NSD in mm)
on both test slabs and write ``report/``: metrics table, training curves, overlays. Whatever wins is printed as is.
"""

from __future__ import annotations

from pathlib import Path

from rich.console import Console

from ..data.demo_data import DEMO_DATASETS
from ..evaluation.compare import ModelSpec, compare
from .accuracy import CONVERGE
from .selection import preset

console = Console(stderr=True)

FEWSHOT = 0.1
"""Share of the training slices the demo trains on (H-SAM's few-label setting)."""
SHIFT = "mni152-tissue-bias"
"""The shifted test set: the same test slab under a simulated MR bias field (``samadapt.data.shifts``)."""
PATIENCE = 4
"""Validations without improvement before a model stops (validation at most once per 12 optimizer steps)."""
MAX_EPOCHS = 300
"""The most epochs per model (an epoch of 9 slices is one or two optimizer steps)."""


def _dataset(out: Path, name: str) -> Path:
    """The demo dataset ``name`` inside ``out/data`` (built once, reused by later runs)."""
    return Path(DEMO_DATASETS[name](out / "data" / name))


def run_demo(out: Path, method: str = "decoder", minutes: float | None = None, threads: int | None = None,
             baselines: bool = True) -> list[dict]:
    """Run the whole demo into ``out``; returns the per-case metrics rows (one per model, test set and class).

    ``minutes`` replaces the convergence budget by a wall-clock one per model (CPU-dependent);
    ``baselines=False`` trains and evaluates ``method`` alone (no unet, no box-prompt).
    """
    models = [ModelSpec(method, preset(method))]
    if baselines:
        if method != "unet":
            models.append(ModelSpec("unet", preset("unet")))
        models.append(ModelSpec("box-prompt-gt", preset("box-prompt", "oracle")))
    data_path = _dataset(out, "mni152-tissue")
    console.print(f"[bold]dataset[/] {data_path} ({FEWSHOT:.0%} of the training slices), shifted test set {SHIFT}")
    budget = (dict(minutes=minutes) if minutes is not None else dict(epochs=MAX_EPOCHS, patience=PATIENCE))
    how = (f"at most {minutes:g} min training per model" if minutes is not None
           else f"trained until validation Dice stopped improving ({PATIENCE} validations)")
    return compare(data_path, models, out, threads=threads, targets=[(SHIFT, _dataset(out, SHIFT))],
                   common=[f"data.fewshot={FEWSHOT}", f"train.val_every_steps={CONVERGE['val_every_steps']}"],
                   title=f"samadapt demo: MNI152 tissue from {FEWSHOT:.0%} of the training slices on LiteMedSAM "
                         f"({method}; {how}), source test slab and {SHIFT}", **budget)
