"""Loading state dicts loudly, and where downloaded weights live.

``load_state_dict_checked`` strips the wrappers users' checkpoints come in (``model``/``state_dict`` entries,
``module.`` from DDP, ``_orig_mod.`` from ``torch.compile``) and raises ``CheckpointError`` listing the keys when
nothing matches or keys are missing, instead of silently loading half a model.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping

import torch
from torch import nn

from .errors import CheckpointError

_WRAPPER_KEYS = ("model", "state_dict", "model_state_dict")
_PREFIXES = ("module.", "_orig_mod.")


def cache_dir() -> Path:
    """Folder for downloaded weights: ``$SAMADAPT_HOME`` or the user's cache dir (``~/.cache/samadapt``)."""
    env = os.environ.get("SAMADAPT_HOME")
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "samadapt"


def unwrap_state_dict(obj: object) -> dict[str, torch.Tensor]:
    """Return the plain name -> tensor mapping inside a checkpoint object, prefixes stripped."""
    while isinstance(obj, Mapping):
        inner = next((obj[k] for k in _WRAPPER_KEYS if k in obj and isinstance(obj[k], Mapping)), None)
        if inner is None:
            break
        obj = inner
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"checkpoint holds a {type(obj).__name__}, not a state dict")
    state = {}
    for key, value in obj.items():
        for prefix in _PREFIXES:
            while key.startswith(prefix):
                key = key[len(prefix):]
        state[key] = value
    return state


def _short_list(keys: list[str], n: int = 12) -> str:
    shown = ", ".join(keys[:n])
    return shown + (f", ... ({len(keys) - n} more)" if len(keys) > n else "")


def load_state_dict_checked(
    module: nn.Module, state: Mapping[str, torch.Tensor], source: str, allow_missing: bool = False
) -> None:
    """Load ``state`` into ``module``; fail loudly on no match, missing keys or shape mismatches.

    ``source`` names the file (or object) in error messages. Unexpected keys are an error too: a checkpoint with
    extra tensors is a checkpoint for another model.
    """
    own = module.state_dict()
    matched = [k for k in state if k in own]
    if not matched:
        raise CheckpointError(
            f"{source}: no key matches the model. Checkpoint keys: {_short_list(sorted(state))}; "
            f"model keys: {_short_list(sorted(own))}"
        )
    missing = sorted(k for k in own if k not in state)
    unexpected = sorted(k for k in state if k not in own)
    wrong_shape = sorted(f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in matched
                         if tuple(state[k].shape) != tuple(own[k].shape))
    problems = []
    if missing and not allow_missing:
        problems.append(f"missing keys: {_short_list(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {_short_list(unexpected)}")
    if wrong_shape:
        problems.append(f"shape mismatches: {_short_list(wrong_shape)}")
    if problems:
        raise CheckpointError(f"{source}: " + "; ".join(problems))
    module.load_state_dict(dict(state), strict=not allow_missing)


def read_torch_checkpoint(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a ``.pth``/``.pt`` file safely (tensors only) and unwrap it; errors name the file."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint file not found")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated zip, pickle with code, not a torch file
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint ({exc.__class__.__name__}: {exc})") from exc
    return unwrap_state_dict(obj)
