"""3D part of the benchmark: seconds per volume through the slice-wise pipeline.

Cases: the whole MNI152 T1 template (1 mm, 189 axial slices of 233 x 197) and, where the Debian package
``invesalius-examples`` is installed, the InVesalius head CT (108 slices of 256 x 256), each written once as NIfTI.
One timed run reads a case, slices it, predicts every slice in batches, reassembles the label volume and writes it
as NIfTI. Each method runs on its trained run where ``trained`` names a folder holding one
(``latency.trained_runs``), else on an untrained head built from its CPU preset (timing only). Variants:
``plain``, ``fast`` and ``fast-bf16`` (``latency.FAST_VARIANTS``), ``onnx`` / ``int8`` (ONNX Runtime: the whole
graph, or a declared split's encoder graph + PyTorch head), ``openvino`` (the fp32 graph in OpenVINO bf16) and
``auto`` (the path ``predict --fast`` chooses, timed on the case's first batch; ``samadapt.engine.path_choice``);
the ONNX exports and the choice are not timed.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Sequence

import torch

from ..data.cases import write_image_like
from ..data.demo_data import mni152_volumes, read_invesalius
from ..data.readers import load_case
from ..engine.path_choice import GRAPH_PATHS, select, variant
from ..engine.path_choice import summary as path_summary
from ..errors import ConfigError, InputError
from .latency import FAST_VARIANTS, exact_predictor, trained_runs
from .memory import peak_rss_mib, reset_peak_rss
from .selection import measured_methods

VARIANTS = (*FAST_VARIANTS, *GRAPH_PATHS, "auto")
DEFAULT_RUNS = ("decoder:fast:8", "decoder:fast:1", "decoder:int8:1", "unet:fast:8")


def write_volumes(folder: Path) -> dict[str, Path]:
    """The cases as NIfTI in ``folder`` (written once): ``MNI152 T1 1 mm`` always, ``InVesalius head CT`` when its
    package is installed."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = {"MNI152 T1 1 mm": folder / "mni152_t1.nii.gz"}
    if not paths["MNI152 T1 1 mm"].exists():
        t1, _, geometry = mni152_volumes("brain")
        write_image_like(t1, geometry, paths["MNI152 T1 1 mm"])
    try:
        ct = read_invesalius()
    except InputError as err:
        print(f"  3D part: no CT case ({err})", flush=True)
        return paths
    paths["InVesalius head CT"] = folder / "invesalius_ct.nii.gz"
    if not paths["InVesalius head CT"].exists():
        write_image_like(ct.image[0], ct, paths["InVesalius head CT"])
    return paths


def _predictor(method: str, variant_name: str, batch: int, work: Path, backbone: str, run: Path | None,
               case_path: Path):
    """The predictor of ``variant_name`` at ``batch``, and what ``auto`` chose (None for the others)."""
    exact = exact_predictor(method, batch, backbone, run)
    if variant_name in FAST_VARIANTS:
        return variant(exact, batch, FAST_VARIANTS[variant_name]), None
    predictor, report = select(exact, variant_name, [load_case(case_path)], batch, work / f"{method}-onnx")
    if variant_name == "auto":
        print(f"  {path_summary(report)}", flush=True)
    return predictor, report["chosen"] if variant_name == "auto" else None


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


def measure(work: Path, runs: Sequence[str] = DEFAULT_RUNS, threads: int = 2, backbone: str = "litemedsam",
            trained: Path | None = None) -> dict:
    """Seconds per volume for each ``METHOD:VARIANT[:BATCH]`` in ``runs`` (read, predict, write; batch 8 unless
    given) on each case of ``write_volumes``, with the peak RSS; ``trained``: a folder of trained runs."""
    torch.set_num_threads(threads)
    cases = write_volumes(work)
    found = trained_runs(Path(trained) if trained else None)
    rows = []
    for spec in runs:
        method, variant_name, batch = parse_run(spec)
        for case_name, path in cases.items():
            predictor, chosen = _predictor(method, variant_name, batch, work, backbone, found.get(method), path)
            reset_peak_rss()
            start = time.perf_counter()
            case = load_case(path)
            predictor.predict_cases([case], work / f"{method}-{variant_name}-b{batch}")
            seconds = time.perf_counter() - start
            slices = case.image.shape[1 + predictor.axis]
            rows.append({"method": method, "trained": method in found, "case": case_name, "variant": variant_name,
                         "chosen": chosen, "batch": predictor.batch_size, "seconds": seconds, "slices": slices,
                         "shape": list(case.image.shape[1:]), "s_per_slice": seconds / slices, "rss": peak_rss_mib()})
            print(f"  {spec} on {case_name}: {seconds:.1f} s per volume ({slices} slices)"
                  + (f", chose {chosen}" if chosen else "") + f", peak RSS {rows[-1]['rss']:.0f} MiB", flush=True)
            del predictor
    return {"backbone": backbone, "threads": threads, "trained": str(trained) if trained else None, "rows": rows}


def markdown(result: dict) -> str:
    lines = [f"Backbone {result['backbone']}; {result['threads']} threads; axial slices; end to end: read NIfTI, "
             "predict every slice, reassemble, write NIfTI. Head: the trained run of "
             + (f"`{result['trained']}`" if result.get("trained") else "none") + " where the method has one, else "
             "untrained (timing only).", "",
             "| method | head | case | variant | batch | s per volume | s per slice | peak RSS MiB |",
             "|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        case = r.get("case", result.get("case", ""))
        shape = " x ".join(str(v) for v in r.get("shape", result.get("shape", [])))
        lines.append(f"| {r['method']} | {'trained' if r.get('trained') else 'untrained'} | {case} ({shape}) | "
                     f"{r['variant'] + (' -> ' + r['chosen'] if r.get('chosen') else '')} | {r['batch']} | "
                     f"{r['seconds']:.1f} | {r['s_per_slice']:.2f} | {r['rss']:.0f} |")
    return "\n".join(lines) + "\n"
