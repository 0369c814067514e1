"""3D part of the benchmark: seconds per volume through the slice-wise pipeline.

The case is the whole MNI152 T1 template (1 mm, 189 axial slices of 233 x 197), written as NIfTI; one timed run
reads it, slices it, predicts every slice in batches, reassembles the label volume and writes it as NIfTI. Heads are
untrained (timing only), built from each method's CPU preset; ``fast`` and ``fast-bf16`` are the fast options of
``latency.FAST_VARIANTS`` (fp32, and with bf16 autocast forced on), ``onnx`` the
exported graph under ONNX Runtime, ``int8`` its int8 copy (``samadapt export --int8``).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Sequence

import torch

from ..data.cases import write_image_like
from ..data.demo_data import mni152_volumes
from ..data.readers import load_case
from ..engine.export import OnnxPredictor, export_predictor, quantize_int8
from ..engine.fast import EXACT
from ..engine.predict import Predictor
from ..errors import ConfigError
from .latency import FAST_VARIANTS, build
from .memory import peak_rss_mib, reset_peak_rss
from .selection import measured_methods

VARIANTS = (*FAST_VARIANTS, "onnx", "int8")
DEFAULT_RUNS = ("decoder:fast:8", "decoder:fast:1", "decoder:int8:1", "unet:fast:8")


def write_volume(folder: Path) -> Path:
    """The MNI152 T1 template as ``folder/mni152_t1.nii.gz`` (written once)."""
    path = folder / "mni152_t1.nii.gz"
    if not path.exists():
        t1, _, geometry = mni152_volumes("brain")
        write_image_like(t1, geometry, path)
    return path


def _predictor(method: str, variant: str, batch: int, work: Path, backbone: str):
    model, intensity, axis = build(method, backbone)
    predictor = Predictor(model, intensity, axis, batch_size=batch, fast=FAST_VARIANTS.get(variant, EXACT))
    if variant not in ("onnx", "int8"):
        return predictor
    onnx_path = work / f"{method}.onnx"
    export_predictor(predictor, onnx_path)
    if variant == "int8":
        quantize_int8(onnx_path, work / f"{method}-int8.onnx")
        onnx_path = work / f"{method}-int8.onnx"
    return OnnxPredictor(onnx_path, batch_size=batch, threads=torch.get_num_threads())


def parse_run(spec: str) -> tuple[str, str, int]:
    """``"METHOD:VARIANT[:BATCH]"`` -> (method, variant, batch); batch 8 when not given."""
    fields = spec.split(":")
    batch = fields[2] if len(fields) == 3 else "8"
    methods = measured_methods("latency")
    if len(fields) not in (2, 3) or fields[0] not in methods or fields[1] not in VARIANTS or not batch.isdigit() \
            or int(batch) < 1:
        raise ConfigError(f"volume run {spec!r} must be METHOD:VARIANT[:BATCH] with METHOD in {methods}, "
                          f"VARIANT in {VARIANTS} and BATCH a positive integer")
    return fields[0], fields[1], int(batch)


def measure(work: Path, runs: Sequence[str] = DEFAULT_RUNS, threads: int = 2, backbone: str = "litemedsam") -> dict:
    """Seconds per volume for each ``METHOD:VARIANT[:BATCH]`` in ``runs`` (read, predict, write; batch 8 unless
    given), with the peak RSS."""
    torch.set_num_threads(threads)
    path = write_volume(work)
    rows = []
    for spec in runs:
        method, variant, batch = parse_run(spec)
        predictor = _predictor(method, variant, batch, work, backbone)
        reset_peak_rss()
        start = time.perf_counter()
        case = load_case(path)
        predictor.predict_cases([case], work / f"{method}-{variant}-b{batch}")
        seconds = time.perf_counter() - start
        slices = case.image.shape[1 + predictor.axis]
        rows.append({"method": method, "variant": variant, "batch": batch, "seconds": seconds, "slices": slices,
                     "s_per_slice": seconds / slices, "rss": peak_rss_mib()})
        print(f"  {spec}: {seconds:.1f} s per volume ({slices} slices), peak RSS {rows[-1]['rss']:.0f} MiB",
              flush=True)
        del predictor
    return {"backbone": backbone, "case": "MNI152 T1 1 mm", "shape": list(case.image.shape[1:]), "threads": threads,
            "rows": rows}


def markdown(result: dict) -> str:
    z, y, x = result["shape"]
    lines = [f"Backbone {result['backbone']}; {result['case']} ({z} x {y} x {x}, sliced along z), {result['threads']} "
             "threads; end to end: read NIfTI, predict every slice, reassemble, write NIfTI.", "",
             "| method | variant | batch | s per volume | s per slice | peak RSS MiB |", "|---|---|---|---|---|---|"]
    lines += [f"| {r['method']} | {r['variant']} | {r['batch']} | {r['seconds']:.1f} | {r['s_per_slice']:.2f} | "
              f"{r['rss']:.0f} |" for r in result["rows"]]
    return "\n".join(lines) + "\n"
