"""One checked state-dict load and one read of the JSON manifest a weights file carries beside it.

A leaf module (it imports only ``errors`` and torch): backbones load users' weight files through it, LoRA adapters
(``layers``) and adapter-only checkpoints (``engine``) too, and backbones sit below layers, so it cannot live in
either package.

``load_state_checked`` refuses, listing the keys, a state that matches no key of the model, misses keys, has keys
the model lacks or tensors of other shapes, instead of silently loading half a model. ``read_sidecar_manifest``
reads ``NAME.json`` beside ``NAME.safetensors`` (a checkpoint's or an adapter's manifest).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from .errors import CheckpointError


def short_list(keys: list[str], n: int = 12) -> str:
    shown = ", ".join(keys[:n])
    return shown + (f", ... ({len(keys) - n} more)" if len(keys) > n else "")


def check_state_keys(expected: Mapping[str, torch.Tensor], state: Mapping[str, torch.Tensor], source: object) -> None:
    """Raise ``CheckpointError`` naming ``source`` unless ``state`` has exactly the keys of ``expected``, each tensor
    of the same shape; the message lists the missing, unexpected and mis-shaped keys (or, when nothing matches, the
    keys of both sides)."""
    matched = [k for k in state if k in expected]
    if not matched:
        raise CheckpointError(f"{source}: no key matches the model. Checkpoint keys: {short_list(sorted(state))}; "
                              f"model keys: {short_list(sorted(expected))}")
    missing = sorted(k for k in expected if k not in state)
    unexpected = sorted(k for k in state if k not in expected)
    wrong_shape = sorted(f"{k} {tuple(state[k].shape)} vs {tuple(expected[k].shape)}" for k in matched
                         if tuple(state[k].shape) != tuple(expected[k].shape))
    problems = []
    if missing:
        problems.append(f"missing keys: {short_list(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {short_list(unexpected)}")
    if wrong_shape:
        problems.append(f"shape mismatches: {short_list(wrong_shape)}")
    if problems:
        raise CheckpointError(f"{source}: " + "; ".join(problems))


def load_state_checked(module: nn.Module, state: Mapping[str, torch.Tensor], source: object,
                       expected: Mapping[str, torch.Tensor] | None = None) -> None:
    """Load ``state`` into ``module`` after :func:`check_state_keys` against ``expected`` (default: the whole
    ``module.state_dict()``; a part of it, e.g. the adapter tensors, loads that part and leaves the rest as is).
    Tensors are copied onto each parameter's device and dtype."""
    check_state_keys(module.state_dict() if expected is None else expected, state, source)
    module.load_state_dict(dict(state), strict=expected is None)


def read_sidecar_manifest(path: str | Path, kind: str = "checkpoint") -> dict[str, Any]:
    """The JSON object in ``<path without suffix>.json``; ``CheckpointError`` naming that file when it is missing,
    not JSON or not an object (``kind`` says whose manifest it is in the message)."""
    weights = Path(path)
    manifest_path = weights.with_suffix(".json")
    if not manifest_path.is_file():
        raise CheckpointError(f"{manifest_path}: {kind} manifest not found (expected beside {weights.name})")
    try:
        manifest = json.loads(manifest_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{manifest_path}: {kind} manifest is not valid JSON ({exc})") from exc
    if not isinstance(manifest, dict):
        raise CheckpointError(f"{manifest_path}: {kind} manifest is not a JSON object")
    return manifest
