"""2D picture folders: ``images/`` + ``masks/`` with matching file stems (Kvasir-SEG, CVC, ISIC, MoNuSeg style).

Pictures: PNG, JPG, TIF, BMP; gray, RGB (alpha dropped, ``samadapt data check`` warns) or 16-bit; a folder may
mix gray and RGB pictures (gray ones are read as three equal channels, as SAM's input is made; data check says so).
Masks: gray (or RGB with equal channels, or palette PNG) holding either {0, 255} (binary; read as {0, 1}) or integer
class ids declared in an optional ``labels.json`` (``{"labels": {"background": 0, "polyp": 1}, "modality":
"natural"}``); without one the dataset is binary. JPEG masks (lossy) are thresholded at 128 and must be binary. A mask
may carry a suffix after the image stem (``ISIC_0000000_segmentation.png`` matches ``ISIC_0000000.jpg``). A folder
with ``images/`` only gives test cases to predict, and so does a bare folder of pictures. Folder names also accepted:
``imgs``/``image``/``Original`` and ``mask``/``labels``/``gts``/``Ground Truth``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from ...errors import InputError
from .. import _io
from ..cases import IMAGE_2D_ENDINGS, Case, file_ending, strip_ending
from . import READERS
from .base import DatasetSource, _preview, optional_labels_file, validate_label

IMAGE_DIRS = ("images", "imgs", "image", "Original", "original")
MASK_DIRS = ("masks", "mask", "labels", "gts", "Ground Truth", "ground_truth", "GroundTruth")
MASK_SUFFIXES = ("_segmentation", "_Segmentation", "_mask", "_Mask", "_seg", "_gt", "_label", "_anno")
LOSSY = (".jpg", ".jpeg")


def find_subdir(root: Path, names: tuple[str, ...]) -> Path | None:
    for name in names:
        if (root / name).is_dir():
            return root / name
    return None


def has_pictures(folder: Path) -> bool:
    """Whether ``folder`` directly holds PNG/JPG/TIF/BMP files."""
    return any(p.is_file() and file_ending(p) in IMAGE_2D_ENDINGS for p in folder.iterdir())


def _pictures(folder: Path) -> dict[str, Path]:
    found: dict[str, Path] = {}
    for p in sorted(folder.iterdir()):
        if p.is_file() and not p.name.startswith(".") and file_ending(p) in IMAGE_2D_ENDINGS:
            stem = strip_ending(p)
            if stem in found:
                raise InputError(p, f"two pictures share the stem {stem!r}: {found[stem].name} and {p.name}")
            found[stem] = p
    return found


@READERS.register
class Folder2DSource(DatasetSource):
    """Reader of a 2D picture folder (see module docstring)."""

    format = "folder2d"

    def __init__(self, root: str | Path, modality: str | None = None, images_dir: Path | None = None,
                 masks_dir: Path | None = None, threshold_masks: bool = False):
        """``images_dir`` / ``masks_dir``: explicit folders (layouts whose folder names are not the usual ones, e.g.
        ISIC-2018's); by default they are found under ``root``. ``threshold_masks``: binary masks holding grey
        levels (once-JPEG or anti-aliased edges, as in PraNet's polyp sets) are thresholded at 128 like JPEG masks."""
        super().__init__(root, modality)
        self.threshold_masks = threshold_masks
        if images_dir is None:
            images_dir, masks_dir = find_subdir(self.root, IMAGE_DIRS), find_subdir(self.root, MASK_DIRS)
        if images_dir is None:
            if not self.root.is_dir() or not has_pictures(self.root):
                raise InputError(self.root, f"no images folder (expected one of {', '.join(IMAGE_DIRS)}) "
                                            "and no pictures in the folder itself")
            images_dir, masks_dir = self.root, None  # a bare folder of pictures: cases to predict
        self.images_dir = images_dir
        self.masks_dir = masks_dir
        labels, self.labels_file, content = optional_labels_file(self.root)
        self.labels = labels or {"background": 0, "foreground": 1}
        self.binary = self.num_classes == 1
        self.modality = modality or str(content.get("modality", "natural"))
        self.images = _pictures(images_dir)
        if not self.images:
            raise InputError(images_dir, "no pictures (PNG, JPG, TIF, BMP) found")
        self.masks: dict[str, Path] = {}
        if self.masks_dir is not None:
            masks = _pictures(self.masks_dir)
            for stem, path in masks.items():
                image_stem = self._image_stem_for(stem)
                if image_stem is None:
                    raise InputError(path, f"mask has no image with a matching stem in {images_dir}")
                if image_stem in self.masks:
                    raise InputError(path, f"second mask for image {image_stem!r} (first: {self.masks[image_stem]})")
                self.masks[image_stem] = path
            missing = sorted(set(self.images) - set(self.masks))
            if missing:
                raise InputError(self.images[missing[0]], f"image has no mask with a matching stem in {self.masks_dir}"
                                 + (f" ({len(missing)} images lack masks: {_preview(missing)})" if len(missing) > 1 else ""))
            self.case_ids = sorted(self.images)
        else:
            self.test_case_ids = sorted(self.images)
        split = self.root / "splits.json"
        self.split_file = split if split.is_file() else None

    def _image_stem_for(self, mask_stem: str) -> str | None:
        if mask_stem in self.images:
            return mask_stem
        for suffix in MASK_SUFFIXES:
            if mask_stem.endswith(suffix) and mask_stem[: -len(suffix)] in self.images:
                return mask_stem[: -len(suffix)]
        return None

    def case_files(self, case_id: str) -> dict[str, Any]:
        self._check_id(case_id)
        return {"image": [self.images[case_id]], "label": self.masks.get(case_id)}

    def load(self, case_id: str) -> Case:
        files = self.case_files(case_id)
        image_path: Path = files["image"][0]
        facts: dict = {}
        picture = _io.read_picture(image_path, facts=facts)
        volume = _io.picture_to_volume(picture)
        label = None
        mask_path = files["label"]
        if mask_path is not None:
            label = self._read_mask(mask_path, picture.shape[:2])
        return Case(
            id=case_id, image=volume.array.astype(np.float32), label=label, source=str(image_path),
            modality=self._modality_of(picture), is_2d=True, file_ending=".png",
            channel_names=["gray"] if volume.array.shape[0] == 1 else ["R", "G", "B"],
            nonfinite=self.nonfinite,
            meta={"label_source": str(mask_path) if mask_path else None, "dtype": str(picture.dtype),
                  "mask_scale": 255 if self.binary else 1, **facts},
        )

    def _modality_of(self, picture: np.ndarray) -> str:
        if self._modality_override is not None or self.modality != "natural":
            return self.modality
        return "natural" if picture.dtype == np.uint8 else "other"

    def _read_mask(self, path: Path, image_hw: tuple[int, int]) -> np.ndarray:
        mask = _io.read_picture(path, mask=True)
        if mask.ndim == 3:
            if not (np.array_equal(mask[..., 0], mask[..., 1]) and np.array_equal(mask[..., 0], mask[..., 2])):
                raise InputError(path, "colour mask (RGB channels differ); expected a gray or palette class map")
            mask = mask[..., 0]
        if tuple(mask.shape) != tuple(image_hw):
            raise InputError(path, f"mask size {mask.shape[1]}x{mask.shape[0]} differs from image size "
                                   f"{image_hw[1]}x{image_hw[0]} (W x H)")
        if file_ending(path) in LOSSY or (self.threshold_masks and self.binary and mask.max() > 1):
            if not self.binary:
                raise InputError(path, "JPEG (lossy) masks can only be binary; store class ids as PNG")
            mask = (mask >= 128).astype(np.uint8)
        else:
            values = set(np.unique(mask).tolist())
            if self.binary and values <= {0, 255}:
                mask = (mask > 0).astype(np.uint8)
            elif self.binary and 255 in values:
                raise InputError(path, f"mask values {sorted(values)[:10]} are neither {{0, 255}} nor {{0, 1}}")
        declared = str(self.labels_file) if self.labels_file else "the default binary labels (add a labels.json)"
        return validate_label(mask, self.labels, path, declared)[None]
