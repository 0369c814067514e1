"""Device choice: every tensor follows the configured device (CPU, CUDA or MPS); no device literals."""

from __future__ import annotations

import contextlib
import os
import platform
from pathlib import Path

import torch

from ..errors import ConfigError


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", 0)
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise ConfigError(f"unknown device {name!r} ({exc})") from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {name!r} requested but CUDA is not available")
    return device


def autocast(device: torch.device, amp: str):
    """An autocast context for ``amp`` in none | bf16 | fp16."""
    if amp == "none":
        return contextlib.nullcontext()
    if amp not in ("bf16", "fp16"):
        raise ConfigError(f"amp must be none, bf16 or fp16, got {amp!r}")
    if amp == "fp16" and device.type != "cuda":
        raise ConfigError("fp16 autocast needs CUDA; use amp=bf16 on CPU")
    dtype = torch.bfloat16 if amp == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def to_device(batch: dict, device: torch.device) -> dict:
    """Move every tensor (and ``Features``) in a batch dict to ``device``."""
    out = {}
    for key, value in batch.items():
        if hasattr(value, "to") and (isinstance(value, torch.Tensor) or hasattr(value, "embedding")):
            out[key] = value.to(device)
        else:
            out[key] = value
    return out


SIMD_FLAGS = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_int8", "amx_tile")


def cpu_capabilities() -> dict:
    """The CPU's model name, logical cores and the SIMD flags that matter for inference (from /proc/cpuinfo),
    the kernel family PyTorch dispatches to, and whether oneDNN computes bf16 natively (not emulated)."""
    cpu, flags = platform.processor() or "unknown", set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
            elif line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    try:
        kernels = torch.backends.cpu.get_cpu_capability()
    except AttributeError:
        kernels = "unknown"
    return {"cpu": cpu, "cores": os.cpu_count(), "simd": [f for f in SIMD_FLAGS if f in flags],
            "torch_kernels": kernels, "bf16_native": cpu_bf16_native()}


def cpu_bf16_native() -> bool:
    """True when oneDNN computes bfloat16 matmuls/convolutions natively on this CPU (AVX512-BF16 or AMX)."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False
