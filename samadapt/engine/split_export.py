"""Split export: the encoder of a method whose prediction is not one graph runs in ONNX Runtime, the rest in PyTorch.

For a method that declares ``split_export`` (DeSAM, ProMISe: their ``predict`` loops or chooses prompts in
Python), ``export_encoder`` writes ``Method.encode_image`` as one graph: ``image`` (B x 3 x S x S float32 in [0, 1],
B dynamic) -> ``encoded0`` (the embedding B x C x h x w), ``encoded1``... (the intermediate maps the method asks
for), LoRA merged. ``SplitPredictor`` feeds that graph batch by batch and gives its outputs to
``Method.predict_encoded``, so the loops and prompt choices stay the method's own Python code.

Checked at export, on a second input with another batch size: every graph output against PyTorch's, within
``SPLIT_TOLERANCE`` of the largest magnitude of that output (max |ONNX - PyTorch| / max(1, max |PyTorch|)), else
nothing is written. The end-to-end probability difference through the head on that input is recorded too
(``check_probability_error``; grid-mode DeSAM thresholds IoUs, so a flip there would show as a difference of 1).
``int8=True`` writes the encoder with int8 MatMul/Gemm weights (as ``samadapt.engine.export.quantize_int8``), gated
on the end-to-end probabilities: mean |int8 - fp32| <= ``INT8_TOLERANCE``.
"""

from __future__ import annotations

import copy
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from ..data.slices import collate
from ..errors import ConfigError
from ..io_utils import atomic_path
from ..layers.lora import lora_modules, merge_lora
from ..methods import Method
from .device import autocast
from .export import (INT8_OPS, INT8_TOLERANCE, OPSET, RUNTIMES, _check_image, _first_line, _session, graph_session,
                     traceable_tinyvit)
from .predict import Predictor

SPLIT_TOLERANCE = 1e-4


class EncodeImage(nn.Module):
    """``method.encode_image`` as a plain module: image B x 3 x S x S -> tuple of float32 maps."""

    def __init__(self, method: Method):
        super().__init__()
        self.method = method

    def forward(self, image: Tensor) -> tuple[Tensor, ...]:
        return tuple(t.float() for t in self.method.encode_image(image))


def check_splittable(method: Method) -> None:
    """``ConfigError`` naming the method when it does not declare a split export."""
    if not getattr(method, "split_export", False):
        raise ConfigError(f"method {method.name!r} has no split export (it exports as one graph, or not at all)")


def _relative_errors(got: list[np.ndarray], expected: tuple[Tensor, ...]) -> list[float]:
    return [float(np.abs(g - e.numpy()).max() / max(1.0, float(e.abs().max()))) for g, e in zip(got, expected)]


def export_encoder(method: Method, path: str | Path, opset: int = OPSET,
                   tolerance: float = SPLIT_TOLERANCE) -> dict[str, Any]:
    """Write ``method.encode_image`` to ``path`` and check every output against PyTorch (module docstring).

    Returns what was checked: output count, the largest relative error per output and the end-to-end probability
    error on the check input. ``ConfigError`` for a method without a split, a failing export or a check beyond
    ``tolerance`` (nothing written then)."""
    check_splittable(method)
    method = method.eval()
    if lora_modules(method):  # one matmul per adapted Linear; the caller's method keeps its adapters
        method = copy.deepcopy(method)
        merge_lora(method)
    module = EncodeImage(method).eval()
    size = method.input_size
    path = Path(path)
    with atomic_path(path) as tmp, torch.no_grad():
        n_out = len(module(_check_image(size, 1, 0)))
        names = [f"encoded{i}" for i in range(n_out)]
        with warnings.catch_warnings(), traceable_tinyvit(module):
            warnings.simplefilter("ignore")  # tracer warnings on shape asserts; correctness is checked below
            try:
                torch.onnx.export(module, (_check_image(size, 1, 0),), str(tmp), dynamo=False, opset_version=opset,
                                  input_names=["image"], output_names=names,
                                  dynamic_axes={n: {0: "batch"} for n in ["image", *names]})
            except Exception as exc:  # torch.onnx raises several types
                raise ConfigError(f"method {method.name!r}: its encoder cannot be exported to ONNX: "
                                  f"{_first_line(exc)}") from exc
        check = _check_image(size, 2, 1)
        expected = module(check)
        try:
            got = _session(tmp).run(None, {"image": check.numpy()})
        except Exception as exc:  # onnxruntime's Fail on a graph traced with a frozen batch
            raise ConfigError(f"method {method.name!r}: its exported encoder fails in ONNX Runtime on a batch of 2 "
                              f"({_first_line(exc)})") from exc
        if [g.shape for g in got] != [tuple(e.shape) for e in expected]:
            raise ConfigError(f"method {method.name!r}: the exported encoder gives shapes {[g.shape for g in got]} "
                              f"for a batch of 2, PyTorch {[tuple(e.shape) for e in expected]}")
        errors = _relative_errors(got, expected)
        if not max(errors) <= tolerance:
            raise ConfigError(f"method {method.name!r}: the exported encoder differs from PyTorch by "
                              f"{max(errors):.2e} (relative, > {tolerance:.0e}) on a check input")
        batch = {"image": check}
        ours = method.predict(batch).float()
        theirs = method.predict_encoded(batch, tuple(torch.from_numpy(g) for g in got)).float()
    return {"method": method.name, "outputs": n_out, "check_relative_errors": errors, "tolerance": tolerance,
            "check_probability_error": float((ours - theirs).abs().max())}


def quantize_encoder(method: Method, source: str | Path, path: str | Path,
                     tolerance: float = INT8_TOLERANCE) -> dict[str, Any]:
    """Write an int8 copy (``INT8_OPS`` weights, dynamic activations) of the encoder graph ``source`` to ``path``;
    mean |probability difference| to the fp32 graph through ``method``'s head on the check input <= ``tolerance``,
    else ``ConfigError`` and nothing written. Returns the two measurements."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    path = Path(path)
    with atomic_path(path) as tmp, torch.no_grad():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            quantize_dynamic(str(source), str(tmp), op_types_to_quantize=list(INT8_OPS),
                             weight_type=QuantType.QInt8, extra_options={"MatMulConstBOnly": True})
        check = _check_image(method.eval().input_size, 2, 1)
        probs = [method.predict_encoded({"image": check}, tuple(torch.from_numpy(o) for o in
                                                                _session(p).run(None, {"image": check.numpy()})))
                 for p in (source, tmp)]
        error = float((probs[1] - probs[0]).abs().mean())
        if not error <= tolerance:
            raise ConfigError(f"method {method.name!r}: the int8 encoder moves probabilities by {error:.3f} on "
                              f"average on the check input (> {tolerance}); keep the fp32 encoder")
    return {"quantization": f"int8 dynamic ({', '.join(INT8_OPS)} weights)", "int8_check_mean_abs_error": error,
            "int8_check_agreement": float((probs[1].argmax(1) == probs[0].argmax(1)).float().mean())}


class SplitPredictor(Predictor):
    """``Predictor`` whose encoder runs in ONNX Runtime (the graph of ``export_encoder``) and whose head is the
    PyTorch method of ``predictor`` (its fast options and autocast included); slicing and writing are shared.

    ``predict_probabilities`` feeds batches of ``batch_size`` images (B x 3 x S x S float32) to the session and
    gives its outputs to ``method.predict_encoded``."""

    def __init__(self, predictor: Predictor, path: str | Path, batch_size: int | None = None,
                 threads: int | None = None, metadata: dict[str, Any] | None = None, runtime: str = "onnxruntime"):
        check_splittable(predictor.method)
        if predictor.device.type != "cpu":
            raise ConfigError("the split ONNX path runs on the CPU; predict on cpu (--device cpu)")
        self.__dict__.update(predictor.__dict__)
        self.feature_source = None
        self.batch_size = batch_size or predictor.batch_size
        self.path = Path(path)
        self.metadata = dict(metadata or {})
        self.runtime = runtime
        self.session = graph_session(path, threads, runtime)

    def describe(self) -> dict:
        """The PyTorch head's description, plus the encoder's runtime, file and precision."""
        return {**super().describe(), "runtime": f"{self.runtime} encoder + pytorch head", "onnx": str(self.path),
                "quantization": self.metadata.get("quantization")}

    def summary(self) -> str:
        return (f"{RUNTIMES[self.runtime]} encoder ({self.path.name}, {self.metadata.get('quantization') or 'fp32'})"
                f" + PyTorch head: {super().summary()}")

    @torch.inference_mode()
    def predict_probabilities(self, items: list[dict]) -> list[Tensor]:
        """Class probabilities (K+1) x S x S for each slice item."""
        out: list[Tensor] = []
        for start in range(0, len(items), self.batch_size):
            batch = collate(items[start:start + self.batch_size])
            image = batch["image"].float().contiguous()
            encoded = tuple(torch.from_numpy(o) for o in self.session.run(None, {"image": image.numpy()}))
            with autocast(self.device, self.amp):
                probs = self.method.predict_encoded(batch, encoded)
            out.extend(probs.float())
        return out
