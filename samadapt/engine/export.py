"""ONNX export of a method's whole prediction path, and an ONNX Runtime predictor.

The exported graph maps ``image`` (B x 3 x S x S float32 in [0, 1], the batch convention; B dynamic) to
``probabilities`` (B x (K + 1) x S x S float32): preprocessing, the frozen encoder and the method's head, as
``method.predict({"image": image})`` computes them. The run's data settings (intensity, slicing axis, modality) and
the method/backbone identity are stored in the model's metadata (key ``samadapt``, JSON), so that
``OnnxPredictor`` reads and slices cases exactly as ``Predictor`` does.

Every export is verified: ONNX Runtime's output on a second, different input (another batch size) must match
PyTorch within ``ONNX_TOLERANCE`` (max absolute difference of probabilities), else nothing is written.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import types
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from ..data.preprocessing import Geometry, IntensityConfig
from ..data.slices import collate
from ..errors import ConfigError, InputError
from ..io_utils import atomic_path
from ..layers.lora import lora_modules, merge_lora
from ..methods import Method
from .predict import Predictor

ONNX_TOLERANCE = 1e-4
OPSET = 17
INT8_TOLERANCE = 0.1
"""int8 models: the largest mean absolute probability difference to the fp32 model on the check input (a sanity
gate against a broken quantisation; int8 moves single probabilities by up to ~0.3 near class boundaries)."""
INT8_AGREEMENT = 0.93
"""int8 models: the least share of pixels whose class equals the fp32 model's on real slices, for an untrained
LiteMedSAM decoder head (the worst case: its probabilities sit near 0.5; measured 0.953 on 3 MNI152 slices). A
trained head agrees far better: the 4-minute demo decoder on the MNI152 test slab agrees on 0.999 of the voxels,
Dice 0.9925 against fp32's 0.9918."""
INT8_OPS = ("MatMul", "Gemm")
"""Ops given int8 weights. Conv stays fp32: ONNX Runtime's dynamic ConvInteger was 1.5x slower than fp32 Conv on
this project's AVX2 CPU, while int8 MatMul/Gemm (the Linear layers: about half the encoder's FLOPs) was faster."""


class ImageToProbabilities(nn.Module):
    """``method.predict`` as a plain module: image B x 3 x S x S in [0, 1] -> probabilities B x (K + 1) x S x S."""

    def __init__(self, method: Method):
        super().__init__()
        self.method = method

    def forward(self, image: Tensor) -> Tensor:
        return self.method.predict({"image": image}).float()


def _patch_merging_forward(self, x: Tensor) -> Tensor:
    """TinyViT ``PatchMerging.forward`` with the batch read as ``x.shape[0]`` (traced) instead of ``len(x)`` (a
    Python int the tracer freezes, so the exported graph only worked for the export batch size). Same math."""
    if x.ndim == 3:
        h, w = self.input_resolution
        x = x.view(x.shape[0], h, w, -1).permute(0, 3, 1, 2)
    x = self.act(self.conv1(x))
    x = self.act(self.conv2(x))
    x = self.conv3(x)
    return x.flatten(2).transpose(1, 2)


@contextlib.contextmanager
def traceable_tinyvit(model: nn.Module):
    """While exporting, give every TinyViT ``PatchMerging`` in ``model`` a trace-friendly forward (instance patch,
    removed afterwards; the encoder's code and weights are untouched)."""
    patched = [m for m in model.modules()
               if type(m).__name__ == "PatchMerging" and hasattr(m, "input_resolution") and hasattr(m, "conv3")]
    for m in patched:
        m.forward = types.MethodType(_patch_merging_forward, m)
    try:
        yield len(patched)
    finally:
        for m in patched:
            del m.forward


def check_exportable(method: Method) -> None:
    """Raise ``ConfigError`` naming the method and why (``Method.why_not_exportable``), when its prediction cannot be
    exported to ONNX."""
    why = method.why_not_exportable()
    if why is not None:
        raise ConfigError(f"method {method.name!r} cannot be exported to ONNX: {why}")


RUNTIMES = {"onnxruntime": "ONNX Runtime", "openvino-bf16": "OpenVINO (bf16)"}
"""The runtimes an exported graph runs in (``graph_session``), with the names summaries print."""


def graph_session(path: str | Path, threads: int | None = None, runtime: str = "onnxruntime"):
    """A session over the ONNX file ``path`` answering ``run(None, feed)``: ONNX Runtime, or OpenVINO in bf16
    (``samadapt.engine.openvino_session``)."""
    if runtime == "openvino-bf16":
        from .openvino_session import OpenVinoSession

        return OpenVinoSession(path, threads)
    if runtime != "onnxruntime":
        raise ConfigError(f"unknown graph runtime {runtime!r}; expected one of {', '.join(RUNTIMES)}")
    return _session(path, threads)


def _session(path: str | Path, threads: int | None = None):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads or torch.get_num_threads()
    options.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _check_image(size: int, batch: int, seed: int) -> Tensor:
    """A smooth random image batch in [0, 1] (structure at several scales, so heads see non-trivial features)."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(batch, 1, 8, 8, generator=g)
    img = torch.nn.functional.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False)
    img = (img + 0.1 * torch.rand(batch, 1, size, size, generator=g)).clamp(0, 1)
    return img.expand(-1, 3, -1, -1).contiguous()


def export_onnx(method: Method, path: str | Path, metadata: dict[str, Any] | None = None, opset: int = OPSET,
                tolerance: float = ONNX_TOLERANCE) -> dict[str, Any]:
    """Export ``method``'s prediction (image -> probabilities) to ``path`` and verify it with ONNX Runtime.

    ``metadata`` (JSON-able) is stored under the model's ``samadapt`` metadata key, together with the input size,
    class count, method name and the measured error. Returns that metadata. Raises ``ConfigError`` for a method
    that cannot be exported, or when ONNX Runtime disagrees with PyTorch by more than ``tolerance``.
    """
    import onnx

    check_exportable(method)
    method = method.eval()
    if lora_modules(method):  # one matmul per adapted Linear in the graph; the caller's method keeps its adapters
        method = copy.deepcopy(method)
        merge_lora(method)
    module = ImageToProbabilities(method).eval()
    size = method.input_size
    path = Path(path)
    with atomic_path(path) as tmp:
        with torch.no_grad(), warnings.catch_warnings(), traceable_tinyvit(module):
            warnings.simplefilter("ignore")  # tracer warnings on shape asserts; correctness is checked below
            try:
                torch.onnx.export(module, (_check_image(size, 1, 0),), str(tmp), dynamo=False, opset_version=opset,
                                  input_names=["image"], output_names=["probabilities"],
                                  dynamic_axes={"image": {0: "batch"}, "probabilities": {0: "batch"}})
            except Exception as exc:  # torch.onnx raises several types (SymbolicValueError, RuntimeError, ...)
                raise ConfigError(f"method {method.name!r} cannot be exported to ONNX: {_first_line(exc)}") from exc
            check = _check_image(size, 2, 1)
            expected = module(check).numpy()
        try:
            got = _session(tmp).run(None, {"image": check.numpy()})[0]
        except Exception as exc:  # onnxruntime's Fail/RuntimeException on a graph that only works for one batch
            raise ConfigError(f"method {method.name!r}: exported graph fails in ONNX Runtime on a batch of 2 "
                              f"({_first_line(exc)}); its prediction is not traceable") from exc
        if got.shape != expected.shape:
            raise ConfigError(f"method {method.name!r}: exported graph gives shape {got.shape} for a batch of 2, "
                              f"PyTorch {expected.shape}; its prediction is not traceable with a dynamic batch")
        error = float(np.abs(got - expected).max())
        if not error <= tolerance:
            raise ConfigError(f"method {method.name!r}: ONNX Runtime differs from PyTorch by {error:.2e} "
                              f"(> {tolerance:.0e}) on a check input; its prediction is not traceable")
        meta = {**(metadata or {}), "method": method.name, "num_classes": method.num_classes, "input_size": size,
                "opset": opset, "check_max_abs_error": error, "tolerance": tolerance}
        model = onnx.load(str(tmp))
        model.metadata_props.add(key="samadapt", value=json.dumps(meta, default=str))
        onnx.save(model, str(tmp))
    return meta


def _first_line(exc: Exception) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]


def export_predictor(predictor: Predictor, path: str | Path, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Export a ``Predictor``'s method with its data settings (intensity, axis, modality, geometry) as metadata."""
    meta = {"intensity": dataclasses.asdict(predictor.intensity), "axis": predictor.axis,
            "modality": predictor.modality, "geometry": dataclasses.asdict(predictor.geometry), **(extra or {})}
    return export_onnx(predictor.method, path, meta)


def quantize_int8(source: str | Path, path: str | Path, tolerance: float = INT8_TOLERANCE) -> dict[str, Any]:
    """Write an int8 copy of the exported model ``source`` to ``path``: dynamic quantisation of the weights of
    ``INT8_OPS`` (activations quantised per batch at run time), checked against ``source`` in ONNX Runtime.

    int8 changes outputs beyond fp32 rounding: the mean absolute probability difference on the check input must be
    at most ``tolerance`` (else nothing is written); the share of check pixels whose class agrees is reported. Check
    the int8 model on your own validation data (``samadapt evaluate``) before relying on it. Returns the metadata
    stored in the new model (the source's, plus ``quantization`` and the two measurements).
    """
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    meta = read_metadata(source)
    path = Path(path)
    with atomic_path(path) as tmp:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            quantize_dynamic(str(source), str(tmp), op_types_to_quantize=list(INT8_OPS),
                             weight_type=QuantType.QInt8, extra_options={"MatMulConstBOnly": True})
        check = _check_image(int(meta["input_size"]), 2, 1).numpy()
        expected = _session(source).run(None, {"image": check})[0]
        got = _session(tmp).run(None, {"image": check})[0]
        error = float(np.abs(got - expected).mean())
        if not error <= tolerance:
            raise ConfigError(f"{source}: the int8 model's probabilities differ from fp32 by {error:.3f} on average "
                              f"on the check input (> {tolerance}); keep the fp32 model")
        meta = {**meta, "quantization": f"int8 dynamic ({', '.join(INT8_OPS)} weights)",
                "int8_check_agreement": float((got.argmax(1) == expected.argmax(1)).mean()),
                "int8_check_mean_abs_error": error}
        model = onnx.load(str(tmp))
        del model.metadata_props[:]
        model.metadata_props.add(key="samadapt", value=json.dumps(meta, default=str))
        onnx.save(model, str(tmp))
    return meta


def read_metadata(path: str | Path) -> dict[str, Any]:
    """The ``samadapt`` metadata of an exported model; ``InputError`` if the file is not one."""
    import onnx

    path = Path(path)
    if not path.is_file():
        raise InputError(path, "no such ONNX model file")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # onnx raises DecodeError and others on non-ONNX bytes
        raise InputError(path, f"not a readable ONNX model ({type(exc).__name__})") from None
    props = {p.key: p.value for p in model.metadata_props}
    if "samadapt" not in props:
        raise InputError(path, "ONNX model has no samadapt metadata; export it with `samadapt export`")
    return json.loads(props["samadapt"])


class OnnxPredictor(Predictor):
    """``Predictor`` with ONNX Runtime instead of PyTorch for the model; slicing, reassembly and writing are shared.

    ``predict_probabilities`` feeds batches of ``batch_size`` slices (B x 3 x S x S float32) to the session."""

    def __init__(self, path: str | Path, batch_size: int = 8, threads: int | None = None,
                 runtime: str = "onnxruntime"):
        meta = read_metadata(path)
        intensity = dict(meta.get("intensity") or {})
        if "percentiles" in intensity:
            intensity["percentiles"] = tuple(intensity["percentiles"])
        self.path = Path(path)
        self.metadata = meta
        self.runtime = runtime
        self.session = graph_session(path, threads, runtime)
        self.intensity = IntensityConfig(**intensity)
        self.axis = int(meta.get("axis", 0))
        self.geometry = Geometry(**(meta.get("geometry") or {}))  # files exported before it: SAM's longest side
        self.batch_size = batch_size
        self.input_size = int(meta["input_size"])
        self.modality = meta.get("modality")
        self.device = torch.device("cpu")
        self.fast = None
        self.clicks = 0  # simulated clicks need the PyTorch method (``Predictor.use_clicks``)

    def describe(self) -> dict:
        """How this predictor computes: its runtime on the CPU with the model file's own precision."""
        return {"device": "cpu", "runtime": self.runtime, "onnx": str(self.path),
                "quantization": self.metadata.get("quantization")}

    def summary(self) -> str:
        return f"{RUNTIMES[self.runtime]} on cpu: {self.path.name} ({self.metadata.get('quantization') or 'fp32'})"

    def predict_probabilities(self, items: list[dict]) -> list[Tensor]:
        """Class probabilities (K+1) x S x S for each slice item."""
        out: list[Tensor] = []
        for start in range(0, len(items), self.batch_size):
            image = collate(items[start:start + self.batch_size])["image"].float().contiguous().numpy()
            probs = self.session.run(None, {"image": image})[0]
            out.extend(torch.from_numpy(probs))
        return out
