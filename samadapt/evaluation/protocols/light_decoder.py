"""HeterSAM's light decoder against the full path (frozen SAM mask decoder): speed and 3D test accuracy.

:func:`evaluate_light_decoder` is the protocol (``samadapt evaluate light-decoder``)::

    samadapt evaluate light-decoder --run NAME=RUN_DIR [--run NAME=RUN_DIR ...] --out OUT_DIR \\
        [--threads 2] [--timing-slices 16]

Each run (``samadapt train`` of method ``hetersam``; on K-class data its K one-vs-rest heads, combined as
``OneVsRest.predict`` does) is rebuilt from its best checkpoint (chosen on the validation split). On every test case
of the dataset's split, each slice goes once through the prompt branch and the fusion (E', D), then through the
frozen SAM mask decoder (``full``) and, when the run trained one (``light_decoder: true``), through the light head
(``light``); both volumes are reassembled and scored in 3D (``samadapt.evaluation.metrics.compute_metrics``: Dice,
IoU, HD95/NSD/ASSD in mm). Encoder outputs come from the run's embedding cache (computed here when the run has
none); the encoder itself is timed separately on ``timing_slices`` test slices, so the per-slice times are: encoder,
prompt branch + fusion, decoder (SAM's or the light head), and end to end. Speed is reported as ratios against the
full path measured in the same run and process (absolute seconds depend on the machine's load). Writes
``OUT_DIR/results.json`` and ``OUT_DIR/results.md`` (atomically).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Mapping

import torch

from samadapt.data.slices import collate, reassemble, volume_slices
from samadapt.engine.predict import Predictor
from samadapt.engine.rundir import checkpoint_config, resolve_checkpoint
from samadapt.engine.run import open_source
from samadapt.errors import ConfigError
from samadapt.io_utils import atomic_write_text
from samadapt.methods.base import upsample_to
from samadapt.evaluation.metrics import compute_metrics

METRICS = ("dice", "iou", "hd95", "nsd", "assd")


def _probs(logits: list[torch.Tensor], size: int) -> list[torch.Tensor]:
    """Per-head foreground logits (K x B x 1 x h x w) -> class probabilities B x (K + 1) x S x S, as OneVsRest."""
    fg = torch.cat([torch.sigmoid(upsample_to(x.float(), size)) for x in logits], dim=1)
    probs = torch.cat([torch.prod(1 - fg, dim=1, keepdim=True), fg], dim=1)
    return list((probs / probs.sum(dim=1, keepdim=True).clamp_min(1e-8)).cpu())


@torch.inference_mode()
def evaluate_run(name: str, run: Path, timing_slices: int, batch_size: int) -> list[dict]:
    """The rows of one hetersam run: one per test case, class and decoder path (see the module docstring)."""
    checkpoint = resolve_checkpoint(run)
    predictor = Predictor.from_checkpoint(checkpoint, device="cpu", batch_size=batch_size, use_cache=True)
    method = predictor.method.eval()
    heads = list(getattr(method, "heads", [method]))  # one-vs-rest on K-class data
    if method.name != "hetersam":
        raise ConfigError(f"{run}: method {method.name!r}, expected hetersam")
    if heads[0].config.faithful:
        raise ConfigError(f"{run}: faithful (min-max) runs are not supported by this protocol")
    config, _ = checkpoint_config(checkpoint)
    source = open_source(config.data)
    paths = ["full"] + (["light"] if heads[0].light_head is not None else [])
    classes = list(range(1, len(heads) + 1))
    seconds = {"prompt_fusion": 0.0, "full": 0.0, "light": 0.0, "encoder": 0.0}
    n_slices, n_encoded = 0, 0
    rows = []
    for case_id in source.make_split().test:
        case = source.load(case_id)
        ds = volume_slices(case, predictor.axis, method.input_size, predictor.intensity, predictor.geometry)
        probs: dict[str, list] = {p: [] for p in paths}
        for start in range(0, len(ds), batch_size):
            batch = collate([ds[i] for i in range(start, min(start + batch_size, len(ds)))])
            if predictor.feature_source is not None:
                batch["features"] = predictor.feature_source(batch)  # cached encoder outputs
            if n_encoded < timing_slices:
                t = time.perf_counter()
                method.backbone.encode(method.backbone.preprocess(batch["image"]))
                seconds["encoder"] += time.perf_counter() - t
                n_encoded += len(batch["image"])
            t = time.perf_counter()
            fused = [head.fused(batch) for head in heads]
            seconds["prompt_fusion"] += time.perf_counter() - t
            t = time.perf_counter()
            full = [head.sam_decode(e, d) for head, (e, d) in zip(heads, fused)]
            seconds["full"] += time.perf_counter() - t
            probs["full"].extend(_probs(full, method.input_size))
            if "light" in paths:
                t = time.perf_counter()
                light = [head.light_head(e + d) for head, (e, d) in zip(heads, fused)]
                seconds["light"] += time.perf_counter() - t
                probs["light"].extend(_probs(light, method.input_size))
            n_slices += len(batch["image"])
        for path in paths:
            pred = reassemble(probs[path], predictor.axis, case, geometry=predictor.geometry)
            scores = compute_metrics(pred, case.label, classes=classes, spacing=case.spacing)
            for c in classes:
                rows.append({"model": name, "fusion": heads[0].config.fusion, "path": path, "case": case_id,
                             "class": c, **{m: scores[c][m] for m in METRICS}})
    enc = seconds["encoder"] / max(n_encoded, 1)
    pf = seconds["prompt_fusion"] / max(n_slices, 1)
    for row in rows:
        dec = seconds[row["path"]] / max(n_slices, 1)
        full_dec = seconds["full"] / max(n_slices, 1)
        row.update({"encoder_s": enc, "prompt_fusion_s": pf, "decoder_s": dec, "end_to_end_s": enc + pf + dec,
                    "decoder_vs_full": dec / full_dec, "post_encoder_vs_full": (pf + dec) / (pf + full_dec),
                    "end_to_end_vs_full": (enc + pf + dec) / (enc + pf + full_dec), "slices": n_slices})
    return rows


def _fmt(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


COLUMNS = ("model", "fusion", "path", "case", "class", *METRICS, "encoder_s", "prompt_fusion_s", "decoder_s",
           "end_to_end_s", "decoder_vs_full", "post_encoder_vs_full", "end_to_end_vs_full")


def light_decoder_markdown(rows: list[dict]) -> str:
    """The report of :func:`evaluate_light_decoder`'s rows: one Markdown table row each."""
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(_fmt(r[c]) for c in COLUMNS) + " |" for r in rows]
    return (f"# HeterSAM: light decoder vs full path (torch threads {torch.get_num_threads()})\n\n"
            "Times are seconds per slice on this machine; *_vs_full are ratios against the full path of the same run, "
            "measured in the same process.\n\n" + "\n".join(lines) + "\n")


def evaluate_light_decoder(runs: Mapping[str, str | os.PathLike], out: str | os.PathLike, *, timing_slices: int = 16,
                           batch_size: int = 8) -> list[dict]:
    """Light vs full decoder of every hetersam run in ``runs`` ({name: run folder}) on its dataset's test split.

    Rows (``COLUMNS``): per run, test case, foreground class and path (``full``, and ``light`` when trained): the 3D
    metrics, seconds per slice of each stage and the ratios against the full path. Writes ``out/results.json`` (the
    rows) and ``out/results.md`` (:func:`light_decoder_markdown`).
    """
    if not runs:
        raise ConfigError("the light-decoder protocol needs at least one hetersam run")
    if timing_slices < 0 or batch_size < 1:
        raise ConfigError(f"timing_slices must be >= 0 and batch_size >= 1, got {timing_slices} and {batch_size}")
    rows = []
    for name, run in runs.items():
        rows += evaluate_run(name, Path(run), timing_slices, batch_size)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "results.json", json.dumps(rows, indent=2))
    atomic_write_text(out / "results.md", light_decoder_markdown(rows))
    return rows
