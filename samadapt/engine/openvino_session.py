"""OpenVINO as the runtime of an exported ONNX graph, in bf16.

``OpenVinoSession(path, threads)`` compiles the fp32 ONNX file of ``samadapt.engine.export`` (one graph) or
``samadapt.engine.split_export`` (an encoder graph) for OpenVINO's CPU plugin with ``INFERENCE_PRECISION_HINT=bf16``
and answers ONNX Runtime's ``run(None, feed) -> [outputs in graph order]``, so the ONNX predictors use it unchanged.
bf16 is the point: on a CPU with native bf16 (AMX / AVX512-BF16) OpenVINO's bf16 kernels ran the trained LiteMedSAM
decoder end to end in 0.55x of ONNX Runtime fp32's time (benchmarks/LATENCY.md); without native bf16 the hint falls
back to fp32, which lost to ONNX Runtime, so the path is offered only where bf16 is native
(``samadapt.engine.path_choice``). The package is optional (``pip install 'samadapt[openvino]'``).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import torch

from ..errors import ConfigError


def openvino_available() -> bool:
    """Whether the ``openvino`` package is installed."""
    return importlib.util.find_spec("openvino") is not None


class OpenVinoSession:
    """ONNX Runtime's session interface over an OpenVINO model compiled for the CPU in bf16 (dynamic batch kept)."""

    def __init__(self, path: str | Path, threads: int | None = None):
        if not openvino_available():
            raise ConfigError("the openvino path needs the openvino package: pip install 'samadapt[openvino]'")
        import openvino as ov

        core = ov.Core()
        config = {"INFERENCE_NUM_THREADS": int(threads or torch.get_num_threads()),
                  "INFERENCE_PRECISION_HINT": "bf16", "PERFORMANCE_HINT": "LATENCY"}
        self.model = core.compile_model(core.read_model(str(path)), "CPU", config)

    def run(self, _output_names, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
        result = self.model(feed)
        return [np.asarray(result[output]) for output in self.model.outputs]
