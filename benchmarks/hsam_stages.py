"""Per-class 3D test metrics of a trained H-SAM run for stage 1, stage 2 and their average, beside baseline runs.

Usage::

    python benchmarks/hsam_stages.py --hsam RUN_DIR [--baseline NAME=RUN_DIR ...] --out OUT_DIR [--threads 2]

Every run is rebuilt from its best checkpoint (chosen on the validation split by ``samadapt train``); the test
cases are those of the run's split. H-SAM runs once per slice and its three outputs (``inference_stage`` 1, 2 and
3) are reassembled into three volumes. Per case and foreground class: Dice, and HD95 in mm
(``samadapt.metrics.compute_metrics`` with the case's voxel spacing). Writes ``OUT_DIR/metrics.json`` and
``OUT_DIR/metrics.md``.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch

from samadapt.data.slices import collate, reassemble, volume_slices
from samadapt.engine.checkpoint import read_manifest
from samadapt.engine.predict import Predictor
from samadapt.engine.run import open_source
from samadapt.methods.base import upsample_to
from samadapt.metrics import compute_metrics


def _predictor(run: Path) -> Predictor:
    return Predictor.from_checkpoint(run / "checkpoints" / "best.safetensors", device="cpu", batch_size=4)


def _hsam_stage_volumes(predictor: Predictor, case) -> dict[str, object]:
    method = predictor.method
    ds = volume_slices(case, predictor.axis, method.input_size, predictor.intensity)
    probs: dict[str, list] = {"stage 1": [], "stage 2": [], "average": []}
    with torch.inference_mode():
        for start in range(0, len(ds), predictor.batch_size):
            batch = collate([ds[i] for i in range(start, min(start + predictor.batch_size, len(ds)))])
            out = method(batch)
            s1 = upsample_to(out["stage1"], method.input_size)
            for name, logits in (("stage 1", s1), ("stage 2", out["stage2"]), ("average", 0.5 * (s1 + out["stage2"]))):
                probs[name].extend(torch.softmax(logits.float(), dim=1))
    return {name: reassemble(p, predictor.axis, case) for name, p in probs.items()}


def _score(pred, case, classes) -> dict[int, dict[str, float]]:
    return compute_metrics(pred, case.label, classes=classes, spacing=case.spacing, metrics=("dice", "hd95"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--hsam", required=True, type=Path, help="run folder of samadapt train (method hsam)")
    parser.add_argument("--baseline", action="append", default=[], help="NAME=RUN_DIR (repeatable)")
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    manifest = read_manifest(args.hsam / "checkpoints" / "best.safetensors")
    predictors = {"hsam": _predictor(args.hsam)}
    runs = {"hsam": args.hsam}
    for item in args.baseline:
        name, _, path = item.partition("=")
        runs[name] = Path(path)
        predictors[name] = _predictor(Path(path))
    cfg = predictors["hsam"].method.config
    from samadapt.engine.config import DataConfig

    data_cfg = manifest["config"]["data"]
    source = open_source(DataConfig(**{k: v for k, v in data_cfg.items() if k in DataConfig.__dataclass_fields__}))
    test_ids = manifest["data"]["split"]["test"]  # the run's own split
    classes = list(range(1, source.num_classes + 1))
    names = {int(v): k for k, v in source.describe()["labels"].items()} if "labels" in source.describe() else {}

    rows = []
    for case_id in test_ids:
        case = source.load(case_id)
        t = time.time()
        volumes = {f"hsam {k}": v for k, v in _hsam_stage_volumes(predictors["hsam"], case).items()}
        seconds = {k: (time.time() - t) for k in volumes}
        for name, predictor in predictors.items():
            if name == "hsam":
                continue
            t = time.time()
            volumes[name] = predictor.predict_case(case)
            seconds[name] = time.time() - t
        for model, pred in volumes.items():
            scores = _score(pred, case, classes)
            for c in classes:
                rows.append({"model": model, "case": case_id, "class": c, "class_name": names.get(c, str(c)),
                             **scores[c], "predict_s": round(seconds[model], 1)})

    manifests = {name: read_manifest(run / "checkpoints" / "best.safetensors") for name, run in runs.items()}
    info = {name: {"epoch": m.get("epoch"), "fewshot": m["config"]["data"].get("fewshot"),
                   "train_slices": m.get("data", {}).get("train_slices"),
                   "val_dice": m.get("metrics", {}).get("val_dice")} for name, m in manifests.items()}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "metrics.json").write_text(json.dumps({"rows": rows, "runs": info,
                                                       "hsam_options": vars(cfg) if hasattr(cfg, "__dict__") else {}},
                                                      indent=2, default=str))
    lines = ["| model | " + " | ".join(f"{names.get(c, c)} Dice | {names.get(c, c)} HD95 mm" for c in classes)
             + " | mean Dice | mean HD95 mm |", "|---" * (2 * len(classes) + 3) + "|"]
    for model in dict.fromkeys(r["model"] for r in rows):
        mine = [r for r in rows if r["model"] == model]
        cells = []
        for c in classes:
            rc = [r for r in mine if r["class"] == c]
            d = sum(r["dice"] for r in rc) / len(rc)
            hd = [r["hd95"] for r in rc if not math.isnan(r["hd95"])]
            cells += [f"{d:.4f}", f"{sum(hd) / len(hd):.2f}" if hd else "nan"]
        dice_mean = sum(r["dice"] for r in mine) / len(mine)
        hds = [r["hd95"] for r in mine if not math.isnan(r["hd95"])]
        cells += [f"{dice_mean:.4f}", f"{sum(hds) / len(hds):.2f}" if hds else "nan"]
        lines.append(f"| {model} | " + " | ".join(cells) + " |")
    text = "\n".join(lines) + "\n\nruns: " + json.dumps(info) + "\n"
    (args.out / "metrics.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
