"""Choose the fastest prediction path that stays within tolerance, by timing the first batch on this machine.

Paths (``PATHS``; each built from the exact ``Predictor`` of the model, on its own copy of the method):

- ``eager``: PyTorch with the fp32 fast options (``FastOptions(bf16="off")``);
- ``bf16``: the same with bf16 autocast (a candidate of ``auto`` only where the device computes bf16 natively);
- ``onnx``: ONNX Runtime fp32, the whole prediction as one graph (``samadapt.engine.export``) or, for a method that
  declares ``split_export``, its encoder graph + the PyTorch head (``samadapt.engine.split_export``); CPU only;
- ``int8``: the same graph with int8 MatMul/Gemm weights;
- ``openvino``: the fp32 graph of ``onnx`` run by OpenVINO in bf16 (``samadapt.engine.openvino_session``; a split
  method's PyTorch head then runs under bf16 autocast too); a candidate of ``auto`` only where the CPU computes bf16
  natively and the optional ``openvino`` package is installed.

Each candidate (path x batch size) predicts the first batch's slices once untimed and once timed (seconds per
slice), and is compared with the exact fp32 path on those slices. Tolerances (``TOLERANCES``): the fp32 paths'
probabilities within ``max_abs`` of the exact ones; the lossy paths (bf16, int8, openvino) give the exact path's
class on at least ``AUTO_AGREEMENT`` of the pixels and masks at a foreground Dice of at least ``AUTO_DICE`` against
the exact ones (pixel agreement alone is not enough: on trained MNI152 heads int8 agreed on 0.9991 of the pixels at
Dice 0.9984, the foreground being a small share of the picture). The fastest candidate within tolerance is chosen;
the exact path is always a candidate, so there is always a choice. A pinned path skips the timing
(it is used as asked, its error measured and reported all the same).

The ONNX graphs of a model are exported (and checked) once: ``export_folder`` names a folder of samadapt's cache
per model (its weights digest and settings) and software versions, so a later ``predict --fast`` of the same
model reuses them instead of exporting again (minutes for a LiteMedSAM encoder on a 2-core CPU).
"""

from __future__ import annotations

import copy
import hashlib
import json
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

import torch

from ..data.cases import Case
from ..data.slices import volume_slices
from ..errors import ConfigError
from ..overlap import foreground_dice
from .fast import FP32_TOLERANCE, FastOptions, bf16_native
from .openvino_session import openvino_available
from .predict import Predictor

PATHS = ("eager", "bf16", "onnx", "int8", "openvino")
GRAPH_PATHS = ("onnx", "int8", "openvino")  # the paths that run an exported graph (CPU only)
AUTO_AGREEMENT = 0.999
AUTO_DICE = 0.999


@dataclass(frozen=True)
class Tolerance:
    """``max_abs``: largest |p - p_exact| allowed; ``agreement``: least share of pixels whose class equals the exact
    path's; ``dice``: least foreground Dice against the exact masks (``overlap.foreground_dice``); None: not checked."""

    max_abs: float | None = None
    agreement: float | None = None
    dice: float | None = None

    def holds(self, max_abs: float, agreement: float, dice: float) -> bool:
        return ((self.max_abs is None or max_abs <= self.max_abs)
                and (self.agreement is None or agreement >= self.agreement)
                and (self.dice is None or dice >= self.dice))


FP32 = Tolerance(max_abs=FP32_TOLERANCE)
LOSSY = Tolerance(agreement=AUTO_AGREEMENT, dice=AUTO_DICE)
TOLERANCES = {"exact": FP32, "eager": FP32, "onnx": FP32, "bf16": LOSSY, "int8": LOSSY, "openvino": LOSSY}


@dataclass
class Candidate:
    """A path at a batch size; ``make()`` builds its predictor (exports happen there)."""

    path: str
    batch_size: int
    make: Callable[[], Predictor]

    @property
    def label(self) -> str:
        return f"{self.path} b{self.batch_size}"


def export_folder(model: Any) -> Path:
    """The cache folder of the ONNX graphs of ``model`` (any JSON-able description that changes whenever its
    predictions do: a checkpoint's weights digest and manifest, or a zero-shot model's config), also keyed by the
    samadapt, torch and ONNX Runtime versions: ``cache_dir()/exports/<key>``."""
    from importlib.metadata import PackageNotFoundError, version

    from ..backbones.weights import cache_dir

    versions = {}
    for package in ("samadapt", "torch", "onnxruntime"):
        try:
            versions[package] = version(package)
        except PackageNotFoundError:
            versions[package] = None
    key = json.dumps({"model": model, "versions": versions}, sort_keys=True, default=str)
    return cache_dir() / "exports" / hashlib.sha256(key.encode()).hexdigest()[:20]


def model_key(checkpoint: str | Path | None = None, config: Any = None, num_classes: int = 1) -> dict[str, Any]:
    """What ``export_folder`` keys a model by: a checkpoint's weights digest and manifest, or a zero-shot model's
    config (a ``RunConfig``) and class count."""
    if checkpoint is not None:
        from .checkpoint import read_manifest, weights_fingerprint

        return {"weights": weights_fingerprint(checkpoint), "manifest": read_manifest(checkpoint)}
    return {"config": config.to_dict(), "classes": num_classes}


def variant(exact: Predictor, batch_size: int, fast: FastOptions | None) -> Predictor:
    """A predictor like ``exact`` on a copy of its method, with ``fast`` options and ``batch_size``."""
    p = Predictor(copy.deepcopy(exact.method), exact.intensity, exact.axis, batch_size, exact.device, exact.amp,
                  None, fast, exact.geometry)
    p.modality = exact.modality
    return p


def _onnx(exact: Predictor, batch_size: int, folder: Path, path: str) -> Predictor:
    """The graph predictor of ``exact``'s method for ``path`` (``GRAPH_PATHS``; whole graph, or encoder graph +
    PyTorch head): fp32 or int8 in ONNX Runtime, or the fp32 graph in OpenVINO bf16; exported once into ``folder``
    and reused for other batch sizes and paths."""
    method = exact.method
    int8 = path == "int8"
    runtime = "openvino-bf16" if path == "openvino" else "onnxruntime"
    fp32, q8 = folder / "model.onnx", folder / "model-int8.onnx"
    threads = torch.get_num_threads()
    if getattr(method, "split_export", False):
        from .split_export import SplitPredictor, export_encoder, quantize_encoder

        if not fp32.exists():
            export_encoder(method, fp32)
        meta: dict[str, Any] = {}
        if int8:
            meta = quantize_encoder(method, fp32, q8) if not q8.exists() else {"quantization": "int8"}
        head = FastOptions(bf16="on" if path == "openvino" else "off")  # openvino: a bf16 path, its head too
        return SplitPredictor(variant(exact, batch_size, head), q8 if int8 else fp32, batch_size, threads, meta,
                              runtime)
    from .export import OnnxPredictor, export_predictor, quantize_int8

    if not fp32.exists():
        export_predictor(exact, fp32)
    if int8 and not q8.exists():
        quantize_int8(fp32, q8)
    return OnnxPredictor(q8 if int8 else fp32, batch_size, threads, runtime)


def onnx_available(method) -> bool:
    """Whether the ONNX paths apply to ``method``: one graph, or a declared split."""
    return method.why_not_exportable() is None or bool(getattr(method, "split_export", False))


def auto_paths(device: torch.device, graphs: bool = True) -> list[str]:
    """The paths ``auto`` times on ``device`` besides the exact one: eager always; bf16 where the device computes
    bf16 natively; on the CPU, for a model with a graph (``graphs``), onnx and int8, and openvino where bf16 is
    native and the package is installed."""
    native = bf16_native(device)
    graphs = graphs and device.type == "cpu"
    return ["eager"] + (["bf16"] if native else []) + (["onnx", "int8"] if graphs else []) + \
        (["openvino"] if graphs and native and openvino_available() else [])


def candidates(exact: Predictor, batch_sizes: list[int], paths: list[str] | None = None,
               folder: str | Path | None = None) -> list[Candidate]:
    """The candidates for ``exact``'s model: ``paths`` (None: every path that applies here; the exact path always)
    at each of ``batch_sizes``; ONNX files go to ``folder`` (default: a temporary folder)."""
    if paths is None:
        paths = auto_paths(exact.device, onnx_available(exact.method))
    work = Path(folder) if folder is not None else Path(tempfile.mkdtemp(prefix="samadapt-paths-"))
    made: list[Candidate] = [Candidate("exact", b, lambda b=b: variant(exact, b, None)) for b in batch_sizes]
    for path in paths:
        for b in batch_sizes:
            if path in ("eager", "bf16"):
                fast = FastOptions(bf16="off" if path == "eager" else "on")
                made.append(Candidate(path, b, lambda b=b, fast=fast: variant(exact, b, fast)))
            else:
                made.append(Candidate(path, b, lambda b=b, path=path: _onnx(exact, b, work, path)))
    return made


def _seconds_per_slice(predictor: Predictor, items: list[dict]) -> tuple[float, torch.Tensor]:
    predictor.predict_probabilities(items)  # untimed: first-call allocations, oneDNN/ORT kernel selection
    start = time.perf_counter()
    probs = torch.stack(predictor.predict_probabilities(items))
    return (time.perf_counter() - start) / len(items), probs


def choose(cands: list[Candidate], items: list[dict], reference: torch.Tensor | None = None,
           tolerances: dict[str, Tolerance] = TOLERANCES) -> tuple[Predictor, dict[str, Any]]:
    """Time every candidate on ``items`` (the first batch's slices) and return the fastest one within its tolerance
    of ``reference`` (the exact probabilities N x (K+1) x S x S; default: the first ``exact`` candidate's), with a
    report: ``chosen`` (label), ``path``, ``batch_size`` and ``candidates`` (label, s per slice, max |diff|,
    agreement, foreground Dice, within tolerance, or the error that stopped it)."""
    rows: list[dict[str, Any]] = []
    best: tuple[float, Predictor, Candidate] | None = None
    for cand in cands:
        try:
            predictor = cand.make()
            sec, probs = _seconds_per_slice(predictor, items)
        except Exception as exc:  # a path that cannot run here (export refused, int8 gate, runtime) is skipped
            rows.append({"candidate": cand.label, "error": f"{type(exc).__name__}: {str(exc)[:200]}"})
            continue
        if reference is None and cand.path == "exact":
            reference = probs
        if reference is None:
            raise ValueError("choose needs a reference: pass one or list an exact candidate first")
        max_abs = float((probs - reference).abs().max())
        labels, exact_labels = probs.argmax(1), reference.argmax(1)
        agree = float((labels == exact_labels).float().mean())
        dice = foreground_dice(labels, exact_labels, reference.shape[1])
        ok = tolerances[cand.path].holds(max_abs, agree, dice)
        rows.append({"candidate": cand.label, "s_per_slice": sec, "max_abs": max_abs, "agreement": agree,
                     "dice": dice, "within_tolerance": ok})
        if ok and (best is None or sec < best[0]):
            best = (sec, predictor, cand)
    if best is None:
        raise ValueError(f"no candidate within tolerance: {rows}")
    _, predictor, cand = best
    return predictor, {"chosen": cand.label, "path": cand.path, "batch_size": cand.batch_size, "pinned": False,
                       "candidates": rows}


def pin(exact: Predictor, path: str, batch_size: int, folder: str | Path | None = None
        ) -> tuple[Predictor, dict[str, Any]]:
    """The predictor of ``path`` at ``batch_size``, as asked (no timing, no tolerance check), with its report."""
    if path not in PATHS:
        raise ConfigError(f"--path {path!r}: expected auto or one of {', '.join(PATHS)}")
    if path in GRAPH_PATHS and exact.device.type != "cpu":
        raise ConfigError(f"--path {path} runs on the CPU; add --device cpu")
    if path == "openvino" and not openvino_available():
        raise ConfigError("--path openvino needs the openvino package: pip install 'samadapt[openvino]'")
    if path in GRAPH_PATHS and not onnx_available(exact.method):
        raise ConfigError(f"--path {path}: method {exact.method.name!r} cannot be exported to ONNX: "
                          f"{exact.method.why_not_exportable()}")
    (cand,) = candidates(exact, [batch_size], [path], folder)[1:]
    return cand.make(), {"chosen": cand.label, "path": path, "batch_size": batch_size, "pinned": True,
                         "candidates": []}


def first_slices(exact: Predictor, cases: Iterable[Case], n: int) -> list[dict]:
    """The first ``n`` slice items of ``cases`` (fewer when the cases have fewer), as ``Predictor`` feeds them."""
    items: list[dict] = []
    for case in cases:
        slices = volume_slices(case, exact.axis, exact.input_size, exact.intensity, exact.geometry)
        items.extend(slices[i] for i in range(min(len(slices), n - len(items))))
        if len(items) >= n:
            break
    return items


def select(exact: Predictor, path: str, cases: Iterable[Case], batch_size: int,
           folder: str | Path | None = None) -> tuple[Predictor, dict[str, Any]]:
    """``path`` ``auto``: time every path that applies at batch 1 and ``batch_size`` on the first ``batch_size``
    slices of ``cases`` and keep the fastest within tolerance (``choose``); any other path: ``pin``."""
    if path != "auto":
        return pin(exact, path, batch_size, folder)
    sizes = sorted({1, batch_size})
    return choose(candidates(exact, sizes, None, folder), first_slices(exact, cases, max(sizes)))


def summary(report: dict[str, Any]) -> str:
    """One line: the choice and the timings behind it."""
    if report.get("pinned"):
        return f"prediction path {report['chosen']} (pinned)"
    timed = ", ".join(f"{r['candidate']} {r['s_per_slice']:.3f} s" + ("" if r["within_tolerance"] else " (off)")
                      for r in report["candidates"] if "s_per_slice" in r)
    return f"prediction path {report['chosen']}: fastest within tolerance on the first batch (s/slice: {timed})"
