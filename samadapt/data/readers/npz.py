"""MedSAM-style ``.npz`` cases: one file, or a folder of files, each holding an image and (optionally) a mask.

Keys: image ``imgs`` / ``image`` / ``img``; mask ``gts`` / ``mask`` / ``gt`` / ``label``; optional ``spacing``
(SimpleITK order x, y[, z], as MedSAM's preprocessing saves ``GetSpacing()``) and ``modality``. Shapes:
``H x W`` (gray 2D), ``H x W x 3`` (RGB 2D), ``Z x H x W`` (volume), ``Z x H x W x 3``; masks ``H x W`` or
``Z x H x W``. Classes come from a ``labels.json`` beside the files, else from the ids found in the masks
(named ``class_1``, ``class_2``, ...). 8-bit images (MedSAM's pre-normalised 0-255) are treated as ``natural``.
"""

from __future__ import annotations

import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from ...errors import InputError
from ..cases import Case
from . import READERS
from .base import DatasetSource, guess_modality, optional_labels_file, parse_labels, real_array, validate_label

IMAGE_KEYS = ("imgs", "image", "img", "images")
MASK_KEYS = ("gts", "mask", "gt", "label", "masks", "seg")


def _open_npz(path: Path):
    try:
        return np.load(path, allow_pickle=False)
    except (zipfile.BadZipFile, ValueError, OSError, EOFError) as err:
        raise InputError(path, f"cannot read npz (unreadable or truncated file): {err}") from None


def _get(npz, path: Path, keys: tuple[str, ...], required: bool) -> np.ndarray | None:
    for key in keys:
        if key in npz.files:
            try:
                return npz[key]
            except (zipfile.BadZipFile, ValueError, OSError, EOFError) as err:
                raise InputError(path, f"cannot read array {key!r} (truncated file?): {err}") from None
    if required:
        raise InputError(path, f"no image array: expected one of the keys {list(keys)}, found {npz.files}")
    return None


@READERS.register
class NpzSource(DatasetSource):
    """Reader of MedSAM-style ``.npz`` files (see module docstring)."""

    format = "npz"

    def __init__(self, root: str | Path, modality: str | None = None):
        super().__init__(root, modality)
        if self.root.is_file():
            files = [self.root]
            folder = self.root.parent
        elif self.root.is_dir():
            files = sorted(p for p in self.root.glob("*.npz") if not p.name.startswith("."))
            folder = self.root
        else:
            raise InputError(self.root, "not found")
        if not files:
            raise InputError(self.root, "no .npz files found")
        self.files = {p.name[:-4]: p for p in files}
        labels, self.labels_file, content = optional_labels_file(folder) if self.root.is_dir() else (None, None, {})
        has_mask: dict[str, bool] = {}
        found: set[int] = {0}
        for cid, path in self.files.items():
            with _open_npz(path) as npz:
                has_mask[cid] = any(k in npz.files for k in MASK_KEYS)
                if labels is None and has_mask[cid]:
                    mask = _get(npz, path, MASK_KEYS, True)
                    if mask.dtype.kind == "f" and not np.array_equal(mask, np.round(mask)):
                        raise InputError(path, "mask holds non-integer values; expected integer class ids")
                    values = {int(v) for v in np.unique(mask)}
                    if min(values, default=0) < 0:
                        raise InputError(path, f"negative mask values {sorted(values)[:5]}")
                    found |= values
        if labels is None:
            top = max(found)
            labels = parse_labels({"background": 0, **{f"class_{i}": i for i in range(1, max(top, 1) + 1)}}, self.root)
        self.labels = labels
        self.modality = modality or str(content.get("modality", "other"))
        self.case_ids = sorted(c for c, m in has_mask.items() if m)
        self.test_case_ids = sorted(c for c, m in has_mask.items() if not m)
        self.split_file = (folder / "splits.json") if (folder / "splits.json").is_file() and self.root.is_dir() else None

    def case_files(self, case_id: str) -> dict[str, Any]:
        self._check_id(case_id)
        path = self.files[case_id]
        return {"image": [path], "label": path if case_id in self.case_ids else None}

    def load(self, case_id: str) -> Case:
        self._check_id(case_id)
        path = self.files[case_id]
        with _open_npz(path) as npz:
            img = real_array(_get(npz, path, IMAGE_KEYS, True), path, "image")
            mask = _get(npz, path, MASK_KEYS, False)
            spacing = _get(npz, path, ("spacing",), False)
            modality = _get(npz, path, ("modality",), False)
        two_d = img.ndim == 2 or (img.ndim == 3 and img.shape[-1] in (3, 4) and (mask is None or mask.ndim == 2))
        if two_d:
            chw = img[None] if img.ndim == 2 else np.moveaxis(img[..., :3], -1, 0)
            image = chw[:, None]
        elif img.ndim == 3:
            image = img[None]
        elif img.ndim == 4 and img.shape[-1] in (3, 4):
            image = np.moveaxis(img[..., :3], -1, 0)
        else:
            raise InputError(path, f"image array shape {img.shape} is not H x W, H x W x 3, Z x H x W or Z x H x W x 3")
        label = None
        if mask is not None:
            lab = mask[None] if mask.ndim == 2 else mask
            if tuple(lab.shape) != tuple(image.shape[1:]):
                raise InputError(path, f"mask size {tuple(mask.shape)} differs from image size "
                                       f"{tuple(image.shape[1:]) if not two_d else tuple(image.shape[2:])}")
            label = validate_label(lab, self.labels, path, str(self.labels_file or "the masks found at open"))
        zyx = (1.0, 1.0, 1.0)
        if spacing is not None:
            s = [float(v) for v in np.ravel(spacing)]
            if len(s) == 3:
                zyx = (s[2], s[1], s[0])
            elif len(s) == 2:
                zyx = (1.0, s[1], s[0])
        if self._modality_override is not None:
            mod = self._modality_override
        elif modality is not None and modality.size:
            mod = str(modality.item() if modality.ndim == 0 else modality.ravel()[0])
        elif self.modality != "other":
            mod = self.modality
        else:
            mod = guess_modality(image, img.dtype)
        return Case(id=case_id, image=image.astype(np.float32), label=label, spacing=zyx, source=str(path),
                    modality=mod, is_2d=two_d, file_ending=".png" if two_d else ".nii.gz",
                    nonfinite=self.nonfinite,
                    meta={"label_source": str(path), "dtype": str(img.dtype)})
