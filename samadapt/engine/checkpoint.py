"""Adapter-only checkpoints (trainable parameters in safetensors + a JSON manifest) and resumable state.

``<name>.safetensors`` holds only the method's trainable tensors (plus buffers of trainable modules such as
BatchNorm statistics) and, in its header metadata, the SHA-256 of those tensors (:func:`tensors_digest`);
``<name>.json`` says which method, config, backbone (name and weights hash), epoch and metrics produced it, and
repeats the digest so a manifest never describes other weights than its own. Loading verifies both and refuses
non-finite weights. ``state.pt`` holds what ``--resume`` needs: weights, optimizer, scheduler, epoch, RNG states.
"""

from __future__ import annotations

import hashlib
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ..errors import CheckpointError
from ..io_utils import atomic_path, atomic_write_json
from ..methods.base import Method
from ..state_dicts import load_state_checked, read_sidecar_manifest


def adapter_state(method: Method) -> dict[str, torch.Tensor]:
    """Trainable parameters, plus the buffers of every module that owns a trainable parameter."""
    names = {n for n, _ in method.trainable_parameters()}
    owners = {n.rsplit(".", 1)[0] for n in names if "." in n}
    state = {}
    for key, value in method.state_dict().items():
        owner = key.rsplit(".", 1)[0] if "." in key else ""
        if key in names or (owner in owners and key not in dict(method.named_parameters())):
            state[key] = value.detach().cpu().contiguous()
    return state


def tensors_digest(tensors: dict[str, torch.Tensor]) -> str:
    """SHA-256 (hex) over the names, dtypes, shapes and bytes of ``tensors`` in name order."""
    digest = hashlib.sha256()
    for key in sorted(tensors):
        t = tensors[key].detach().cpu().contiguous()
        digest.update(f"{key}|{t.dtype}|{tuple(t.shape)}|".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def save_checkpoint(method: Method, path: str | Path, manifest: dict[str, Any],
                    tensors: dict[str, torch.Tensor] | None = None) -> Path:
    """Write ``path`` (.safetensors, the digest in its metadata) and its ``.json`` manifest atomically.

    ``tensors`` (default: ``adapter_state(method)``) lets the trainer write weights it committed earlier."""
    path = Path(path).with_suffix(".safetensors")
    tensors = adapter_state(method) if tensors is None else tensors
    digest = tensors_digest(tensors)
    with atomic_path(path) as tmp:
        # one metadata key only: safetensors orders several at random, and equal weights must give equal bytes
        save_file(tensors, str(tmp), metadata={"sha256": digest})
    atomic_write_json(path.with_suffix(".json"), {**manifest, "sha256": digest})
    return path


def checkpoint_digest(path: str | Path) -> str | None:
    """The digest recorded in a checkpoint's header metadata (None for files written before digests)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            return (handle.metadata() or {}).get("sha256")
    except (SafetensorError, OSError):
        return None


def weights_fingerprint(path: str | Path) -> str:
    """What a checkpoint's weights are: the digest recorded in its header, or for a file written before digests
    the SHA-256 of its bytes."""
    digest = checkpoint_digest(path)
    return digest if digest is not None else hashlib.sha256(Path(path).read_bytes()).hexdigest()


def verify_tensors(path: Path, tensors: dict[str, torch.Tensor], manifest: dict[str, Any]) -> None:
    """Raise ``CheckpointError`` when the tensors do not match their recorded digest or are not finite."""
    recorded = checkpoint_digest(path)
    if recorded is not None:
        actual = tensors_digest(tensors)
        if actual != recorded:
            raise CheckpointError(f"{path}: corrupted checkpoint: the weights' SHA-256 {actual[:12]} differs from "
                                  f"the {recorded[:12]} recorded when it was written")
        if manifest.get("sha256") not in (None, recorded):
            raise CheckpointError(f"{path.with_suffix('.json')}: describes other weights (SHA-256 "
                                  f"{str(manifest['sha256'])[:12]}) than {path.name} ({recorded[:12]}); an "
                                  "interrupted save? `samadapt train --resume` repairs a run folder")
    bad = [k for k, t in tensors.items() if t.is_floating_point() and not bool(torch.isfinite(t).all())]
    if bad:
        raise CheckpointError(f"{path}: non-finite (NaN/Inf) weights in {len(bad)} tensor(s): "
                              f"{', '.join(sorted(bad)[:5])}{'...' if len(bad) > 5 else ''}")


def read_manifest(path: str | Path) -> dict[str, Any]:
    """The ``.json`` manifest of checkpoint ``path``; a missing checkpoint is named by its .safetensors file."""
    weights = Path(path).with_suffix(".safetensors")
    if not weights.is_file():
        raise CheckpointError(f"{weights}: checkpoint file not found")
    return read_sidecar_manifest(weights)


def load_checkpoint(method: Method, path: str | Path, expect_backbone: dict | None = None) -> dict[str, Any]:
    """Load adapter tensors into ``method``; fail loudly on another backbone, no match, or missing keys."""
    path = Path(path).with_suffix(".safetensors")
    manifest = read_manifest(path)
    if expect_backbone is not None and "backbone" in manifest:
        have, want = manifest["backbone"], expect_backbone
        for key in ("name", "weights_id"):
            if have.get(key) != want.get(key):
                raise CheckpointError(
                    f"{path}: trained on backbone {have.get('name')} ({str(have.get('weights_id'))[:12]}), "
                    f"but the model uses {want.get('name')} ({str(want.get('weights_id'))[:12]})"
                )
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(f"{path}: not a readable safetensors file ({exc})") from exc
    verify_tensors(path, tensors, manifest)
    apply_adapter_state(method, tensors, path)
    return manifest


def apply_adapter_state(method: Method, tensors: dict[str, torch.Tensor], path: str | Path) -> None:
    """Load ``tensors`` (an ``adapter_state``, read from ``path``) into ``method``; fail loudly on no match, missing
    or unexpected keys or shape mismatches."""
    load_state_checked(method, tensors, path, expected=adapter_state(method))


def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_training_state(path: str | Path, state: dict[str, Any]) -> None:
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def load_training_state(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no training state to resume from")
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:
        raise CheckpointError(f"{path}: unreadable training state ({exc})") from exc
