"""2D slices of loaded cases as a torch ``Dataset`` (the methods' batch convention) and their reassembly.

Each item (see ``samadapt/methods/base.py``; ``S`` = backbone input size):

- ``image``: float32 ``3 x S x S`` in [0, 1] (intensity-normalised per case, resized along the ``geometry`` route:
  longest side + zero-padding by default, or stretched; see ``preprocessing.Geometry``);
- ``label``: int64 ``S x S`` (nearest, the same route, padded with 0), present when the case has a label;
- ``case``: case id (str); ``slice``: index along ``axis`` (int);
- ``key``: content hash (hex) of the final ``image`` tensor, so anything that changes the pixels (intensity
  settings, input size, augmentation) changes the key; the embedding cache uses it;
- ``pad``: :class:`~samadapt.data.preprocessing.PadInfo` (original ``H x W`` of the slice, resized size, ``S``).

``axis`` indexes the case's spatial axes ``Z x Y x X`` (0 = Z, the axial axis of axial acquisitions). Use
:func:`collate` as the DataLoader's ``collate_fn``: it stacks tensors and keeps ``case``/``key``/``pad`` as lists.
"""

from __future__ import annotations

import hashlib
import random
from typing import Any, Sequence

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from ..errors import ConfigError, InputError
from .augment import Augment, build_augment
from .cases import Case
from .preprocessing import LONGEST, Geometry, IntensityConfig, PadInfo, normalize_intensity, pad_info_for, \
    resize_pad, resize_pad_label, restore


def content_key(image: Tensor) -> str:
    """Hex digest (128-bit BLAKE2b) of a tensor's shape, dtype and bytes."""
    t = image.detach().cpu().contiguous()
    digest = hashlib.blake2b(digest_size=16)
    digest.update(f"{tuple(t.shape)}|{t.dtype}|".encode())
    digest.update(t.numpy().tobytes())
    return digest.hexdigest()


def _take(volume: np.ndarray, index: int, axis: int) -> np.ndarray:
    return np.ascontiguousarray(np.take(volume, index, axis=axis))


class SliceDataset(Dataset):
    """2D slices along ``axis`` of already loaded ``cases`` (see the module docstring for the item layout).

    ``intensity`` normalises each case once at construction (kept in fp16; slices are float32). ``augment``: a recipe name (``none``, ``light``,
    ``standard``, ``elastic``) or an :class:`Augment`; augmentation is seeded by (``seed``, epoch, index).
    ``empty_ratio``: training sampler; ``None`` keeps every slice, a number keeps all slices with foreground plus
    ``round(empty_ratio * n_foreground)`` slices without (seeded; redrawn by :meth:`set_epoch`). It raises
    ``InputError`` when no slice has foreground. :meth:`restrict` limits the pool to given ``(case, slice)`` keys
    (few-shot; see ``splits.fewshot_slices``). ``geometry``: how slices become ``S x S`` (default: SAM's longest
    side + padding).
    """

    def __init__(self, cases: Sequence[Case], input_size: int, axis: int = 0,
                 intensity: IntensityConfig = IntensityConfig(), augment: str | Augment | None = None,
                 empty_ratio: float | None = None, seed: int = 0, geometry: Geometry = LONGEST):
        if axis not in (0, 1, 2):
            raise ConfigError(f"slice axis must be 0 (Z), 1 (Y) or 2 (X), got {axis}")
        if empty_ratio is not None and empty_ratio < 0:
            raise ConfigError(f"empty_ratio must be >= 0, got {empty_ratio}")
        self.cases = list(cases)
        if not self.cases:
            raise ConfigError("SliceDataset needs at least one case")
        ids = [c.id for c in self.cases]
        if len(set(ids)) != len(ids):
            raise ConfigError(f"duplicate case ids: {sorted({i for i in ids if ids.count(i) > 1})}")
        self.input_size = int(input_size)
        self.axis = axis
        self.intensity = intensity
        self.geometry = geometry
        self.augment = build_augment(augment, self.input_size) if isinstance(augment, str) or augment is None \
            else augment
        self.empty_ratio = empty_ratio
        self.seed = seed
        self.epoch = 0
        if axis != 0 and any(c.is_2d for c in self.cases):
            raise ConfigError(f"2D pictures can only be sliced along axis 0, got axis={axis}")
        # normalised images are kept in fp16 (error <= 2.5e-4 on [0, 1]) to halve the memory of large volumes
        self._images = [normalize_intensity(c.image, c.modality, intensity).astype(np.float16) for c in self.cases]
        self._case_index = {c.id: i for i, c in enumerate(self.cases)}
        self._foreground: list[np.ndarray] = []
        for c in self.cases:
            n = c.shape[axis]
            if c.label is None:
                self._foreground.append(np.zeros(n, dtype=bool))
            else:
                other = tuple(a for a in range(3) if a != axis)
                self._foreground.append(np.asarray(c.label).any(axis=other))
        self._pool: list[tuple[int, int]] = [(ci, s) for ci, c in enumerate(self.cases) for s in range(c.shape[axis])]
        self.index: list[tuple[int, int]] = []
        self._resample()

    # --- sampling -------------------------------------------------------------------------------------------------
    def _resample(self) -> None:
        if self.empty_ratio is None:
            self.index = list(self._pool)
            return
        if any(c.label is None for c in self.cases):
            missing = [c.source or c.id for c in self.cases if c.label is None]
            raise InputError(missing[0], "the foreground/empty slice sampler needs labels; this case has none")
        fg = [(ci, s) for ci, s in self._pool if self._foreground[ci][s]]
        empty = [(ci, s) for ci, s in self._pool if not self._foreground[ci][s]]
        if not fg:
            where = ", ".join(c.meta.get("label_source") or c.source or c.id for c in self.cases[:3])
            raise InputError(where, f"no slice along axis {self.axis} has foreground; the training sampler needs "
                                    "at least one labelled slice (check the masks, or set empty_ratio=None)")
        k = min(len(empty), int(round(self.empty_ratio * len(fg))))
        rng = random.Random(hash((self.seed, self.epoch)) & 0xFFFFFFFF)
        chosen = rng.sample(empty, k) if k else []
        self.index = sorted(fg + chosen)

    def set_epoch(self, epoch: int) -> None:
        """Redraw the empty slices (when ``empty_ratio`` is set) and change the augmentation seeds."""
        self.epoch = int(epoch)
        self._resample()

    def restrict(self, keys: Sequence[tuple[str, int]]) -> "SliceDataset":
        """Keep only the slices ``(case_id, slice)`` in ``keys`` (in place; returns self)."""
        wanted = set()
        for cid, s in keys:
            if cid not in self._case_index:
                raise ConfigError(f"restrict: unknown case {cid!r}")
            wanted.add((self._case_index[cid], int(s)))
        self._pool = [p for p in self._pool if p in wanted]
        self._resample()
        return self

    @property
    def slice_keys(self) -> list[tuple[str, int]]:
        """``(case_id, slice)`` for every item, in item order."""
        return [(self.cases[ci].id, s) for ci, s in self.index]

    def foreground_keys(self) -> list[tuple[str, int]]:
        """``(case_id, slice)`` of the pool's slices that contain foreground."""
        return [(self.cases[ci].id, s) for ci, s in self._pool if self._foreground[ci][s]]

    # --- items ----------------------------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.index)

    def slice_shape(self, case: Case | int) -> tuple[int, int]:
        """``H x W`` of this dataset's slices of ``case``."""
        c = self.cases[case] if isinstance(case, int) else case
        dims = [d for a, d in enumerate(c.shape) if a != self.axis]
        return dims[0], dims[1]

    def __getitem__(self, i: int) -> dict[str, Any]:
        ci, s = self.index[i]
        case = self.cases[ci]
        image2d = torch.from_numpy(_take(self._images[ci], s, self.axis + 1).astype(np.float32))
        image, pad = resize_pad(image2d, self.input_size, self.geometry)
        item: dict[str, Any] = {"image": image.contiguous()}
        if case.label is not None:
            label2d = torch.from_numpy(_take(np.asarray(case.label), s, self.axis).astype(np.int64))
            item["label"] = resize_pad_label(label2d, self.input_size, self.geometry)
        if self.augment is not None:
            item = self.augment(item, seed=hash((self.seed, self.epoch, i)) & 0xFFFFFFFF)
        item.update({"case": case.id, "slice": s, "key": content_key(item["image"]), "pad": pad})
        return item


def collate(items: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Batch items: ``image`` B x 3 x S x S, ``label`` B x S x S (when every item has one), ``slice`` B (int64),
    ``case``/``key`` lists of str, ``pad`` list of PadInfo. Other tensor entries are stacked, others listed."""
    if not items:
        raise ValueError("empty batch")
    batch: dict[str, Any] = {}
    keys = list(items[0])
    for k in keys:
        if any(k not in it for it in items):
            raise ValueError(f"entry {k!r} is present in some items only")
        values = [it[k] for it in items]
        if k == "pad":
            batch[k] = [PadInfo(*(int(v) for v in p)) for p in values]
        elif isinstance(values[0], Tensor):
            batch[k] = torch.stack(values)
        elif k == "slice":
            batch[k] = torch.tensor(values, dtype=torch.long)
        else:
            batch[k] = list(values)
    return batch


def volume_slices(case: Case, axis: int = 0, input_size: int = 256,
                  intensity: IntensityConfig = IntensityConfig(), geometry: Geometry = LONGEST) -> SliceDataset:
    """Every slice of one case along ``axis`` in order (no sampler, no augmentation), for prediction."""
    return SliceDataset([case], input_size, axis=axis, intensity=intensity, geometry=geometry)


def reassemble(slice_probs: Sequence[Tensor] | Tensor, axis: int, case: Case, return_probs: bool = False,
               geometry: Geometry = LONGEST):
    """Stack per-slice class probabilities back into a volume aligned with ``case``.

    ``slice_probs``: one ``K+1 x S x S`` (padded, as methods predict) or ``K+1 x H x W`` tensor per slice along
    ``axis``, in slice order (or one ``N x K+1 x ...`` tensor). Padded slices are restored bilinearly
    (:func:`~samadapt.data.preprocessing.restore`) along the ``geometry`` route they were made with. Returns the
    argmax label volume ``Z x Y x X`` (uint8, or int32 when K >= 255) or, with ``return_probs=True``, float32
    probabilities ``K+1 x Z x Y x X``.
    """
    n = case.shape[axis]
    if len(slice_probs) != n:
        raise ValueError(f"case {case.id} has {n} slices along axis {axis}, got {len(slice_probs)} predictions")
    dims = [d for a, d in enumerate(case.shape) if a != axis]
    h, w = dims
    outs = []
    for p in slice_probs:
        p = torch.as_tensor(p)
        if p.dim() != 3:
            raise ValueError(f"each slice prediction must be K x H x W, got {tuple(p.shape)}")
        if tuple(p.shape[-2:]) != (h, w):
            if p.shape[-1] != p.shape[-2]:
                raise ValueError(f"slice prediction {tuple(p.shape)} is neither {h}x{w} nor square-padded")
            p = restore(p.float(), pad_info_for(h, w, p.shape[-1], geometry), mode="bilinear")
        outs.append(p.float() if return_probs else p.argmax(0))
    if return_probs:
        return torch.stack(outs, dim=axis + 1).cpu().numpy().astype(np.float32)
    vol = torch.stack(outs, dim=axis).cpu().numpy()
    k = int(torch.as_tensor(slice_probs[0]).shape[0])
    return vol.astype(np.uint8 if k <= 256 else np.int32)
