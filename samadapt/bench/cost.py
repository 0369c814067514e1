"""Training-cost part of the benchmark: time per training step with and without the embedding cache, and peak RSS
of training and of prediction, for every trainable method on LiteMedSAM (MNI152 brain slices, each method's CPU
preset and batch size).

Every measurement runs in its own process (``python -m samadapt.bench.cost ...``), so its peak RSS is its own.
A step is one optimiser step at the preset's batch size (forward, loss, backward, update; with the cache the
encoder outputs are read from disk, filled beforehand and untimed; for the LoRA methods the frozen encoder prefix
is kept in memory from the first epoch). The time is that of the second of two
epochs of ``steps`` steps each, divided by ``steps`` (the first epoch warms up), and includes the epoch's
checkpoint save. Prediction: ``predict_probabilities`` over two batches of test slices (plain fp32 path, no cache),
seconds per slice and the peak RSS of that process.

Training-speed defaults (``SPEED_CHANGES``): each is measured against its absence in the same benchmark run, the
method trained once more with the override that turns it off (from the cache where the method caches); the report
gives step time with the defaults / without the change (below 1: the change saves time).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Sequence

import torch

from ..data.slices import collate, volume_slices
from ..config.run_config import load_config
from ..engine.fast import resolve_amp
from ..engine.predict import Predictor
from ..engine.run import build_model, feature_source, intensity_config, open_source, prepare_data, use_cache
from ..engine.trainer import Trainer
from ..errors import ConfigError
from ..io_utils import atomic_write_json
from .memory import peak_rss_mib, reset_peak_rss
from .selection import measured_methods, preset

SPEED_CHANGES = {"bf16": "train.amp=none", "reuse_memory": "train.reuse_memory=false"}
"""Training-speed defaults -> the override that turns each off: bf16 autocast where the CPU computes bf16 natively
(``train.amp=auto``) and glibc keeping freed tensor memory (``engine.allocator``)."""


def _config(method: str, data: Path, work: Path, cache: bool, epochs: int, backbone: str,
            overrides: Sequence[str] = ()):
    return load_config(preset(method), [f"backbone.name={backbone}", f"data.path={data}",
                                         f"data.cache_dir={work / 'cache'}", f"data.cache={'auto' if cache else 'off'}",
                                         "data.augment=none",
                                         "train.device=cpu", f"train.epochs={epochs}", "train.max_minutes=null",
                                         "train.patience=null", f"output={work / 'run'}", *overrides])


def train_step(method: str, data: Path, work: Path, cache: bool, steps: int, backbone: str = "litemedsam",
               overrides: Sequence[str] = ()) -> dict:
    """Seconds per training step (second epoch of ``steps`` steps), the peak RSS during training in MiB and the
    autocast mode used (``amp``); ``overrides``: dotted settings on top of the preset. Step time and RSS are None
    with ``cache`` for a method that cannot use the cache (none, or it trains through the whole encoder). For
    the LoRA methods ``cache`` is the reuse of the frozen encoder prefix per slice (``set_fixed_inputs``)."""
    cfg = _config(method, data, work, cache, epochs=2, backbone=backbone, overrides=overrides)
    source = open_source(cfg.data)
    backbone, model = build_model(cfg, source.num_classes, torch.device("cpu"))
    reuses_prefix = cache and model.set_fixed_inputs(True) is not None  # LoRA methods: the frozen encoder prefix
    if cache and not (use_cache(model, cfg.data) or reuses_prefix):
        return {"method": method, "cache": cache, "batch": cfg.train.batch_size, "step_s": None, "rss": None,
                "amp": resolve_amp(cfg.train.amp, torch.device("cpu"))}
    ds = prepare_data(cfg.data, model.input_size, source=source).train
    keys = ds.slice_keys
    ds.restrict(keys[:: max(len(keys) // (steps * cfg.train.batch_size), 1)][: steps * cfg.train.batch_size])
    features = feature_source(backbone, model, cfg.data, torch.device("cpu"))
    if features is not None:
        features.cache.precompute(ds, batch_size=cfg.train.batch_size, progress=False)
    reset_peak_rss()
    trainer = Trainer(model, cfg.train, work / "run", {}, torch.device("cpu"), collate=collate,
                      feature_source=features)
    history = trainer.fit(ds, None).history
    second_epoch = history[1]["seconds"] - history[0]["seconds"]
    n_steps = -(-len(ds) // cfg.train.batch_size)
    return {"method": method, "cache": cache, "batch": cfg.train.batch_size, "steps": n_steps,
            "step_s": second_epoch / n_steps, "rss": peak_rss_mib(), "amp": trainer.amp}


def predict_cost(method: str, data: Path, work: Path, backbone: str = "litemedsam") -> dict:
    """Seconds per slice and peak RSS (MiB) of plain fp32 prediction over two batches of test slices."""
    cfg = _config(method, data, work, cache=False, epochs=1, backbone=backbone)
    source = open_source(cfg.data)
    case = source.load(source.make_split().test[0])
    model = build_model(cfg, source.num_classes, torch.device("cpu"))[1]  # untrained head: timing only
    predictor = Predictor(model, intensity_config(cfg.data), cfg.data.axis)
    slices = volume_slices(case, predictor.axis, predictor.input_size, predictor.intensity)
    n = 2 * predictor.batch_size
    middle = len(slices) // 2
    items = [slices[i] for i in range(max(middle - n // 2, 0), min(middle - n // 2 + n, len(slices)))]
    predictor.predict_probabilities(items[:1])  # warm-up
    reset_peak_rss()
    start = time.perf_counter()
    predictor.predict_probabilities(items)
    return {"method": method, "slices": len(items), "batch": predictor.batch_size,
            "predict_s_per_slice": (time.perf_counter() - start) / len(items), "rss": peak_rss_mib()}


def _in_subprocess(args: list[str]) -> dict:
    done = subprocess.run([sys.executable, "-m", "samadapt.bench.cost", *args], capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"samadapt.bench.cost {' '.join(args)} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def measure(data: Path, work: Path, steps: int = 2, threads: int = 2,
            methods: Sequence[str] | None = None, backbone: str = "litemedsam") -> dict:
    """Training step time with and without the cache (where the method can cache) and prediction cost, per method
    of ``methods`` (None: every method that declares the ``"cost"`` benchmark part).

    Returns ``{"steps": ..., "threads": ..., "rows": [{"method", "batch", "step_s_no_cache", "step_s_cache",
    "train_rss_no_cache", "train_rss_cache", "predict_s_per_slice", "predict_rss", "amp", and per ``SPEED_CHANGES``
    name "step_s_without_<name>"}]}`` (None where not applicable).
    """
    rows = []
    measured = measured_methods("cost")
    for method in methods or measured:
        if method not in measured:
            raise ConfigError(f"no training-cost preset for {method!r}; available: {', '.join(measured)}")
        settings = {"steps": steps, "threads": threads, "backbone": backbone, "changes": SPEED_CHANGES}
        done = work / method / "row.json"  # a finished method is not measured again with the same settings
        if done.exists() and json.loads(done.read_text())["settings"] == settings:
            rows.append(json.loads(done.read_text())["row"])
            continue
        common = ["--method", method, "--data", str(data), "--threads", str(threads), "--steps", str(steps),
                  "--backbone", backbone]
        row: dict = {"method": method}
        for cache in (False, True):
            tag = "cache" if cache else "no_cache"
            r = _in_subprocess([*common, "--work", str(work / method / tag), *(["--cache"] if cache else [])])
            row.update({"batch": r["batch"], f"step_s_{tag}": r["step_s"], f"train_rss_{tag}": r["rss"]})
        cached = row["step_s_cache"] is not None
        row["amp"] = r["amp"]
        for name, override in SPEED_CHANGES.items():  # the same run, once more without each default
            r = _in_subprocess([*common, "--work", str(work / method / f"without-{name}"), "--set", override,
                                "--set", f"data.cache_dir={work / method / 'cache' / 'cache'}",  # filled above
                                *(["--cache"] if cached else [])])
            row[f"step_s_without_{name}"] = r["step_s"]
        p = _in_subprocess([*common, "--work", str(work / method / "predict"), "--predict"])
        row.update({"predict_s_per_slice": p["predict_s_per_slice"], "predict_rss": p["rss"]})
        print(f"  {method}: {row}", flush=True)
        atomic_write_json(done, {"settings": settings, "row": row})
        rows.append(row)
    return {"backbone": backbone, "steps": steps, "threads": threads, "rows": rows}


def _fmt(value, digits: int) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def markdown(result: dict) -> str:
    lines = [f"Backbone {result['backbone']}; MNI152 brain training slices, each method's CPU preset and batch, "
             f"{result['threads']} thread(s); step time: the second of two epochs of {result['steps']} step(s), per "
             "step. LoRA methods (train through the encoder): `cache` is the frozen encoder prefix computed once per "
             "slice and reused (the LoRA part runs every step). `n/a`: nothing to cache (unet). Prediction: plain "
             "fp32, batch 8.", "",
             "| method | batch | step s, no cache | step s, cache | speed-up | train peak RSS MiB (no cache / cache) "
             "| predict s/slice | predict peak RSS MiB |", "|" + "---|" * 8]
    for r in result["rows"]:
        plain, cached = r["step_s_no_cache"], r["step_s_cache"]
        speedup = f"{plain / cached:.1f}x" if cached else "n/a"
        lines.append(f"| {r['method']} | {r['batch']} | {_fmt(plain, 2)} | {_fmt(cached, 2)} | {speedup} | "
                     f"{_fmt(r['train_rss_no_cache'], 0)} / {_fmt(r['train_rss_cache'], 0)} | "
                     f"{r['predict_s_per_slice']:.2f} | {r['predict_rss']:.0f} |")
    changed = [r for r in result["rows"] if all(f"step_s_without_{n}" in r for n in SPEED_CHANGES)]
    if changed:
        lines += ["", "Training-speed defaults, each against its absence in the same run (step s with the defaults "
                  "/ without the change; below 1: the change saves time; from the cache where the method caches). "
                  "bf16: autocast where the CPU computes bf16 natively (`train.amp=auto`); reuse_memory: glibc keeps "
                  "freed tensor memory (`train.reuse_memory`).", "",
                  "| method | autocast | step s | " + " | ".join(f"without {n} | ratio" for n in SPEED_CHANGES) + " |",
                  "|" + "---|" * (3 + 2 * len(SPEED_CHANGES))]
        for r in changed:
            step = r["step_s_cache"] if r["step_s_cache"] is not None else r["step_s_no_cache"]
            cells = [f"{_fmt(r[f'step_s_without_{n}'], 2)} | {_ratio(step, r[f'step_s_without_{n}'])}"
                     for n in SPEED_CHANGES]
            lines.append(f"| {r['method']} | {r['amp']} | {_fmt(step, 2)} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _ratio(value, reference) -> str:
    return f"{value / reference:.2f}" if value is not None and reference else "n/a"


def main() -> None:
    ap = argparse.ArgumentParser(description="one training-cost measurement (used by samadapt benchmark)")
    ap.add_argument("--method", required=True, choices=measured_methods("cost"))
    ap.add_argument("--data", required=True, type=Path)
    ap.add_argument("--work", required=True, type=Path)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--cache", action="store_true")
    ap.add_argument("--backbone", default="litemedsam")
    ap.add_argument("--predict", action="store_true", help="measure prediction instead of training")
    ap.add_argument("--set", action="append", default=[], help="dotted setting on top of the preset (repeatable)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.predict:
        result = predict_cost(args.method, args.data, args.work, args.backbone)
    else:
        result = train_step(args.method, args.data, args.work, args.cache, args.steps, args.backbone, args.set)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
