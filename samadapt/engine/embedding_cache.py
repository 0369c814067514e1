"""On-disk cache of frozen-encoder outputs (``Features``) per 2D slice, in fp16 safetensors files.

Layout: ``root / "<backbone name>-<namespace id>" / key[:2] / "<key>.safetensors"``, one file per slice, where the
namespace id hashes the backbone name, ``weights_id`` (the checkpoint's SHA-256), input size, embedding grid,
intermediate widths, whether intermediates are stored and the cache format version; ``key`` is the slice's content
key (``SliceDataset`` item ``key``: a hash of the preprocessed ``3 x S x S`` image, so intensity settings, resizing
and pixels are all part of it). Any change to the backbone, its weights or the preprocessing therefore lands in a
different file and never reuses a stale entry.

Each file holds ``embedding`` (``256 x h x w``) and ``intermediate_<i>`` (``C_i x h_i x w_i``) in fp16 plus
metadata (namespace, key, shapes and a BLAKE2b checksum of the tensor bytes). Entries are written to a temporary
name and renamed; a truncated, corrupt, mismatched or checksum-failing entry is deleted and recomputed. Values are
returned as float32 after the fp16 round trip, whether they were just computed or read back, so a cached epoch
sees exactly what the first epoch saw.

Trade-off: only the un-augmented image has a fixed embedding. Image-space augmentation (flips, rotations,
intensity jitter, elastic) changes the pixels every epoch, so augmented slices get new content keys and would only
fill the disk; train either with the cache (fast, frozen encoder, no image augmentation) or with augmentation
(encoder runs every step). The run config chooses (``data.cache`` / ``data.augment``).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import Tensor

from ..io_utils import atomic_path, atomic_write_text, clean_stale_parts
from ..backbones.base import Backbone, Features, LayerRequest

CACHE_FORMAT = 1


def _checksum(tensors: dict[str, Tensor]) -> str:
    digest = hashlib.blake2b(digest_size=16)
    for name in sorted(tensors):
        t = tensors[name].contiguous()
        digest.update(f"{name}|{tuple(t.shape)}|{t.dtype}|".encode())
        digest.update(t.view(torch.int16).numpy().tobytes() if t.dtype == torch.float16 else t.numpy().tobytes())
    return digest.hexdigest()


class EmbeddingCache:
    """Encoder outputs of ``backbone`` per slice content key (see the module docstring).

    ``intermediates``: also store/return intermediate maps: True for the backbone's default layers, or a role /
    layer indices (``Backbone.resolve_layers``); a selection other than the default is part of the namespace.
    Counters ``hits``, ``misses`` and ``recomputed`` (corrupt entries replaced) are kept for logs and tests.
    """

    def __init__(self, root: str | os.PathLike, backbone: Backbone, intermediates: LayerRequest = False):
        self.root = Path(root)
        self.backbone = backbone
        self.layers = backbone.resolve_layers(intermediates)
        self.intermediates = bool(intermediates)
        self.widths = backbone.widths_of(self.layers)
        self.namespace: dict[str, Any] = {
            "format": CACHE_FORMAT, "backbone": backbone.name, "weights_id": backbone.weights_id,
            "input_size": int(backbone.input_size), "embed_dim": int(backbone.embed_dim),
            "embed_grid": list(backbone.embed_grid), "intermediate_widths": list(backbone.intermediate_widths),
            "intermediates": self.intermediates, "dtype": "float16",
        }
        if self.intermediates and self.layers != tuple(backbone.intermediate_layers):
            self.namespace["intermediate_layers"] = list(self.layers)  # default selection: namespace unchanged
        self.namespace_id = hashlib.sha256(json.dumps(self.namespace, sort_keys=True).encode()).hexdigest()[:16]
        self.dir = self.root / f"{backbone.name}-{self.namespace_id}"
        self.hits = self.misses = self.recomputed = 0
        clean_stale_parts(self.dir)  # temporary files of a writer that was killed

    # --- entries --------------------------------------------------------------------------------------------------
    def path(self, key: str) -> Path:
        if not key or any(c not in "0123456789abcdef" for c in key):
            raise ValueError(f"cache keys are hex content hashes, got {key!r}")
        return self.dir / key[:2] / f"{key}.safetensors"

    def _write_namespace(self) -> None:
        meta = self.dir / "namespace.json"
        if meta.is_file():
            return
        atomic_write_text(meta, json.dumps(self.namespace, indent=2))

    def load(self, key: str) -> Features | None:
        """The entry for ``key`` as fp16 CPU ``Features`` (unbatched ``C x h x w``), or None when absent/invalid.

        An invalid entry (unreadable, truncated, wrong namespace/key/shape, checksum mismatch) is deleted.
        """
        return self._load(key)[0]

    def _load(self, key: str) -> tuple[Features | None, bool]:
        """(features or None, whether an invalid entry was found and deleted)."""
        path = self.path(key)
        if not path.is_file():
            return None, False
        try:
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as handle:
                meta = handle.metadata() or {}
                tensors = {name: handle.get_tensor(name) for name in handle.keys()}
            if meta.get("namespace") != self.namespace_id or meta.get("key") != key:
                raise ValueError("namespace or key mismatch")
            if meta.get("checksum") != _checksum(tensors):
                raise ValueError("checksum mismatch")
            n = len(self.widths) if self.intermediates else 0
            embedding = tensors["embedding"]
            inter = [tensors[f"intermediate_{i}"] for i in range(n)]
            grid = tuple(self.backbone.embed_grid)
            if tuple(embedding.shape) != (self.backbone.embed_dim, *grid) or len(tensors) != 1 + n:
                raise ValueError("unexpected tensors")
            for t, width in zip(inter, self.widths):
                if t.dim() != 3 or t.shape[0] != width:
                    raise ValueError("unexpected intermediate shape")
        except Exception:  # noqa: BLE001 - any failure to read back means: recompute
            path.unlink(missing_ok=True)
            return None, True
        return Features(embedding, inter), False

    def store(self, key: str, features: Features) -> Path:
        """Write one slice's features (unbatched ``C x h x w`` or batch 1) atomically as fp16."""
        from safetensors.torch import save_file

        def single(t: Tensor) -> Tensor:
            t = t[0] if t.dim() == 4 else t
            return t.detach().to("cpu", torch.float16).contiguous()

        tensors = {"embedding": single(features.embedding)}
        if self.intermediates:
            for i, t in enumerate(features.intermediates):
                tensors[f"intermediate_{i}"] = single(t)
        meta = {"namespace": self.namespace_id, "key": key, "checksum": _checksum(tensors)}
        self._write_namespace()
        path = self.path(key)
        with atomic_path(path) as tmp:
            save_file(tensors, str(tmp), metadata=meta)
        return path

    def __contains__(self, key: str) -> bool:
        return self.load(key) is not None

    # --- the API the engine uses ----------------------------------------------------------------------------------
    @torch.no_grad()
    def compute(self, images: Tensor) -> Features:
        """Run the frozen encoder on ``images`` (``B x 3 x S x S`` in [0, 1]) in eval mode, without gradients."""
        encoder = self.backbone.image_encoder
        was_training = encoder.training
        encoder.eval()
        try:
            device = next(self.backbone.parameters()).device
            x = self.backbone.preprocess(images.to(device=device, dtype=torch.float32))
            return self.backbone.encode(x, intermediates=self.layers).detach()
        finally:
            encoder.train(was_training)

    def get_or_compute(self, keys: Sequence[str], images: Tensor) -> Features:
        """Features for a batch: ``embedding`` B x 256 x h x w (+ intermediates), float32 on ``images.device``.

        Entries found on disk are read; missing or invalid ones are computed in one encoder call on the
        corresponding images and stored.
        """
        if len(keys) != images.shape[0]:
            raise ValueError(f"{len(keys)} keys for {images.shape[0]} images")
        found: list[Features | None] = []
        for key in keys:
            entry, invalid = self._load(key)
            self.recomputed += int(invalid)
            found.append(entry)
        missing = [i for i, f in enumerate(found) if f is None]
        self.hits += len(keys) - len(missing)
        self.misses += len(missing)
        if missing:
            computed = self.compute(images[missing])
            for j, i in enumerate(missing):
                one = computed.index([j])
                self.store(keys[i], one)
                found[i] = Features(one.embedding[0].to("cpu", torch.float16),
                                    [t[0].to("cpu", torch.float16) for t in one.intermediates] if self.intermediates
                                    else [])
        batch = Features.stack([f for f in found if f is not None])
        return batch.to(images.device, torch.float32)

    def precompute(self, dataset, batch_size: int = 8, progress: bool = True) -> tuple[int, int]:
        """Make sure every item of ``dataset`` (items with ``image`` and ``key``) has a valid entry.

        Returns ``(n_entries, bytes_on_disk)`` for the dataset's distinct keys. Shows a rich progress bar.
        """
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        seen: set[str] = set()
        pending_keys: list[str] = []
        pending_images: list[Tensor] = []

        def flush() -> None:
            if pending_keys:
                self.get_or_compute(list(pending_keys), torch.stack(pending_images))
                pending_keys.clear()
                pending_images.clear()

        columns = (TextColumn("[bold]cache[/] {task.description}"), BarColumn(), MofNCompleteColumn(),
                   TimeRemainingColumn())
        with Progress(*columns, disable=not progress, transient=False) as bar:
            task = bar.add_task(self.backbone.name, total=len(dataset))
            for i in range(len(dataset)):
                item = dataset[i]
                key = item["key"]
                if key not in seen:
                    seen.add(key)
                    entry, invalid = self._load(key)
                    if entry is None:
                        self.recomputed += int(invalid)
                        pending_keys.append(key)
                        pending_images.append(item["image"])
                        if len(pending_keys) >= batch_size:
                            flush()
                bar.advance(task)
            flush()
        size = sum(self.path(k).stat().st_size for k in seen if self.path(k).is_file())
        return len(seen), size

    def entries(self) -> list[Path]:
        """Every entry file in this cache's namespace."""
        return sorted(self.dir.glob("*/*.safetensors")) if self.dir.is_dir() else []

    def size_on_disk(self) -> int:
        return sum(p.stat().st_size for p in self.entries())

    def clear(self) -> None:
        """Delete this namespace's entries (other backbones' caches are left alone)."""
        import shutil

        shutil.rmtree(self.dir, ignore_errors=True)

    def stats(self) -> dict[str, int]:
        return {"hits": self.hits, "misses": self.misses, "recomputed": self.recomputed}

    def summary(self, entries: int) -> str:
        """One line after :meth:`precompute` of ``entries`` distinct slices in all (counters since this object was
        made): how many were read from disk, computed now, and recomputed because their entry could not be read."""
        return (f"embedding cache {self.dir}: {entries} slice(s), {entries - self.misses} read from disk, "
                f"{self.misses} computed now ({self.recomputed} of them replacing unreadable entries)")
