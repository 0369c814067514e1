"""HeterSAM's light decoder against the full path (frozen SAM mask decoder): speed and 3D test accuracy.

Usage::

    python benchmarks/hetersam_light_decoder.py --run NAME=RUN_DIR [--run NAME=RUN_DIR ...] --out OUT_DIR \
        [--threads 2] [--timing-slices 16]

Each run (``samadapt train`` of method ``hetersam``; on K-class data its K one-vs-rest heads, combined as
``OneVsRest.predict`` does) is rebuilt from its best checkpoint (chosen on the validation split). On every test case of the dataset's split, each slice goes once through the prompt branch and the fusion
(E', D), then through the frozen SAM mask decoder (``full``) and, when the run trained one
(``light_decoder: true``), through the light head (``light``); both volumes are reassembled and scored in 3D
(``samadapt.evaluation.metrics.compute_metrics``: Dice, IoU, HD95/NSD/ASSD in mm). Encoder outputs come from the run's
embedding cache; the encoder itself is timed separately on ``--timing-slices`` test slices, so the per-slice times
are: encoder, prompt branch + fusion, decoder (SAM's or the light head), and end to end. Speed is reported as
ratios against the full path measured in the same run and process (absolute seconds depend on the machine's load).
Writes ``OUT_DIR/results.json`` and ``OUT_DIR/results.md``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from samadapt.data.slices import collate, reassemble, volume_slices
from samadapt.engine.predict import Predictor
from samadapt.engine.run import open_source
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
    predictor = Predictor.from_checkpoint(run / "checkpoints" / "best.safetensors", device="cpu",
                                          batch_size=batch_size, use_cache=True)
    method = predictor.method.eval()
    heads = list(getattr(method, "heads", [method]))  # one-vs-rest on K-class data
    if method.name != "hetersam":
        raise SystemExit(f"{run}: method {method.name!r}, expected hetersam")
    if heads[0].config.faithful:
        raise SystemExit(f"{run}: faithful (min-max) runs are not supported by this benchmark")
    from samadapt.engine.checkpoint import read_manifest
    from samadapt.config.run_config import RunConfig, _update

    config = RunConfig()
    _update(config, read_manifest(run / "checkpoints" / "best.safetensors")["config"], "")
    source = open_source(config.data)
    paths = ["full"] + (["light"] if heads[0].light_head is not None else [])
    classes = list(range(1, len(heads) + 1))
    seconds = {"prompt_fusion": 0.0, "full": 0.0, "light": 0.0, "encoder": 0.0}
    n_slices, n_encoded = 0, 0
    rows = []
    for case_id in source.make_split().test:
        case = source.load(case_id)
        ds = volume_slices(case, predictor.axis, method.input_size, predictor.intensity)
        probs: dict[str, list] = {p: [] for p in paths}
        for start in range(0, len(ds), batch_size):
            batch = collate([ds[i] for i in range(start, min(start + batch_size, len(ds)))])
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
            pred = reassemble(probs[path], predictor.axis, case)
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--run", action="append", required=True, help="NAME=RUN_DIR (repeatable)")
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--timing-slices", type=int, default=16, help="test slices on which the encoder is timed")
    parser.add_argument("--batch-size", type=int, default=8)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = []
    for item in args.run:
        name, _, path = item.partition("=")
        rows += evaluate_run(name, Path(path), args.timing_slices, args.batch_size)
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out / "results.json", json.dumps(rows, indent=2))
    cols = ["model", "fusion", "path", "case", "class", *METRICS, "encoder_s", "prompt_fusion_s", "decoder_s", "end_to_end_s",
            "decoder_vs_full", "post_encoder_vs_full", "end_to_end_vs_full"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(_fmt(r[c]) for c in cols) + " |" for r in rows]
    text = (f"# HeterSAM: light decoder vs full path (torch threads {torch.get_num_threads()})\n\n"
            "Times are seconds per slice on this machine; *_vs_full are ratios against the full path of the same run, "
            "measured in the same process.\n\n" + "\n".join(lines) + "\n")
    atomic_write_text(args.out / "results.md", text)
    print(text)


if __name__ == "__main__":
    main()
