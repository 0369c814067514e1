"""Device choice: every tensor follows the configured device (CPU, CUDA or MPS); no device literals."""

from __future__ import annotations

import contextlib

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
