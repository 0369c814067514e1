"""nnU-Net v2 raw format: ``dataset.json`` + ``imagesTr/`` + ``labelsTr/`` (+ ``imagesTs/``, ``labelsTs/``).

Images are ``{case}_{channel:04d}{file_ending}``, labels ``{case}{file_ending}``. Volumes (NIfTI, NRRD, MHA) are read
with SimpleITK, keeping spacing/origin/direction; 2D pictures (``.png``, ``.bmp``, ``.tif``, ``.jpg``) with PIL, where
one RGB file supplies three channels (nnU-Net's natural-image convention). A ``splits.json`` in the dataset folder
(``{"train": [...], "val": [...], "test": [...]}``) is used as the default split.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from ...errors import InputError
from .. import _io
from ..cases import IMAGE_2D_ENDINGS, Case
from . import READERS
from .base import DatasetSource, _preview, modality_from_channel_name, parse_labels, read_json, validate_label


@READERS.register
class NnUNetSource(DatasetSource):
    """Reader of an nnU-Net v2 raw dataset folder (see module docstring)."""

    format = "nnunet"

    def __init__(self, root: str | Path, modality: str | None = None):
        super().__init__(root, modality)
        self.dataset_json = self.root / "dataset.json"
        if not self.root.is_dir():
            raise InputError(self.root, "not a folder")
        meta = read_json(self.dataset_json)
        if not isinstance(meta, dict):
            raise InputError(self.dataset_json, "expected a JSON object")
        self.meta = meta
        channels = meta.get("channel_names", meta.get("modality"))
        if not isinstance(channels, dict) or not channels:
            raise InputError(self.dataset_json, "missing 'channel_names' (e.g. {\"0\": \"CT\"})")
        try:
            self.channel_names = [str(channels[k]) for k in sorted(channels, key=lambda k: int(k))]
        except ValueError:
            raise InputError(self.dataset_json, f"channel_names keys must be \"0\", \"1\", ...: {channels}") from None
        if "labels" not in meta:
            raise InputError(self.dataset_json, "missing 'labels' (e.g. {\"background\": 0, \"tumour\": 1})")
        self.labels = parse_labels(meta["labels"], self.dataset_json)
        ending = meta.get("file_ending")
        if not isinstance(ending, str) or not ending.startswith("."):
            raise InputError(self.dataset_json, "missing or invalid 'file_ending' (e.g. \".nii.gz\")")
        self.file_ending = ending.lower()
        self.is_2d = self.file_ending in IMAGE_2D_ENDINGS
        self.modality = modality or modality_from_channel_name(self.channel_names[0])

        images_tr, labels_tr = self.root / "imagesTr", self.root / "labelsTr"
        if not labels_tr.is_dir():
            raise InputError(labels_tr, "folder not found (an nnU-Net raw dataset needs labelsTr/)")
        if not images_tr.is_dir():
            raise InputError(images_tr, "folder not found (an nnU-Net raw dataset needs imagesTr/)")
        self.case_ids = sorted(self._stem(p) for p in labels_tr.iterdir() if self._has_ending(p))
        if not self.case_ids:
            raise InputError(labels_tr, f"no label files ending in {self.file_ending}")
        for cid in self.case_ids:
            self._check_channels(images_tr, cid)
        image_cases = self._image_case_ids(images_tr)
        unlabelled = sorted(set(image_cases) - set(self.case_ids))
        if unlabelled:
            self.warnings.append(f"{images_tr}: images without a label in labelsTr are ignored: {_preview(unlabelled)}")
        num_training = meta.get("numTraining")
        if isinstance(num_training, int) and num_training != len(self.case_ids):
            self.warnings.append(
                f"{self.dataset_json}: numTraining is {num_training} but labelsTr holds {len(self.case_ids)} labels")
        images_ts = self.root / "imagesTs"
        if images_ts.is_dir():
            self.test_case_ids = self._image_case_ids(images_ts)
            for cid in self.test_case_ids:
                self._check_channels(images_ts, cid)
        overlap = set(self.test_case_ids) & set(self.case_ids)
        if overlap:
            raise InputError(images_ts, f"case ids used in both imagesTr and imagesTs: {_preview(sorted(overlap))}")
        split = self.root / "splits.json"
        self.split_file = split if split.is_file() else None

    # --- file layout -------------------------------------------------------------------------------------------
    def _has_ending(self, path: Path) -> bool:
        return path.is_file() and path.name.lower().endswith(self.file_ending) and not path.name.startswith(".")

    def _stem(self, path: Path) -> str:
        return path.name[: len(path.name) - len(self.file_ending)]

    def _image_case_ids(self, folder: Path) -> list[str]:
        ids = set()
        for p in folder.iterdir():
            if self._has_ending(p):
                stem = self._stem(p)
                if len(stem) > 5 and stem[-5] == "_" and stem[-4:].isdigit():
                    ids.add(stem[:-5])
                else:
                    self.warnings.append(f"{p}: image name lacks the _0000 channel suffix; ignored")
        return sorted(ids)

    def _channel_path(self, folder: Path, case_id: str, channel: int) -> Path:
        return folder / f"{case_id}_{channel:04d}{self.meta['file_ending']}"

    def _find_channel(self, folder: Path, case_id: str, channel: int) -> Path | None:
        exact = self._channel_path(folder, case_id, channel)
        if exact.is_file():
            return exact
        lower = f"{case_id}_{channel:04d}{self.file_ending}"
        for p in folder.glob(f"{case_id}_{channel:04d}*"):
            if p.name.lower() == lower.lower():
                return p
        return None

    def _check_channels(self, folder: Path, case_id: str) -> list[Path]:
        paths = []
        for c in range(len(self.channel_names)):
            p = self._find_channel(folder, case_id, c)
            if p is None:
                if c > 0 and self.is_2d and len(self.channel_names) == 3:
                    break  # one RGB picture supplies all three channels
                raise InputError(self._channel_path(folder, case_id, c),
                                 f"missing channel file {c:04d} ({self.channel_names[c]}) of case {case_id!r}")
            paths.append(p)
        return paths

    def _label_path(self, case_id: str) -> Path | None:
        if case_id in self.case_ids:
            return self.root / "labelsTr" / f"{case_id}{self.meta['file_ending']}"
        p = self.root / "labelsTs" / f"{case_id}{self.meta['file_ending']}"
        return p if p.is_file() else None

    def case_files(self, case_id: str) -> dict[str, Any]:
        self._check_id(case_id)
        folder = self.root / ("imagesTr" if case_id in self.case_ids else "imagesTs")
        return {"image": self._check_channels(folder, case_id), "label": self._label_path(case_id)}

    # --- reading ------------------------------------------------------------------------------------------------
    def _read(self, path: Path, mask: bool = False) -> _io.Volume:
        if self.is_2d:
            return _io.picture_to_volume(_io.read_picture(path, mask=mask))
        return _io.read_volume(path)

    def load(self, case_id: str) -> Case:
        files = self.case_files(case_id)
        volumes = [self._read(p) for p in files["image"]]
        first = volumes[0]
        for path, vol in zip(files["image"][1:], volumes[1:]):
            problem = _io.same_geometry(first, vol)
            if problem:
                raise InputError(path, f"channel {problem.replace('image', 'channel 0000')}")
        image = np.concatenate([v.array for v in volumes], axis=0)
        if image.shape[0] != len(self.channel_names):
            raise InputError(files["image"][0], f"holds {image.shape[0]} channel(s) in all but dataset.json declares "
                                                f"{len(self.channel_names)}: {self.channel_names}")
        label = None
        label_path = files["label"]
        if label_path is not None:
            lab = self._read(label_path, mask=True)
            if lab.array.shape[0] != 1:
                raise InputError(label_path, f"label has {lab.array.shape[0]} components; expected one class map")
            problem = _io.same_geometry(first, lab)
            if problem:
                raise InputError(label_path, f"mask {problem}")
            label = validate_label(lab.array[0], self.labels, label_path, str(self.dataset_json))
        stored = first.array.dtype
        return Case(
            id=case_id, image=image.astype(np.float32, copy=False), label=label, spacing=first.spacing,
            origin=first.origin, direction=first.direction, source=str(files["image"][0]),
            modality=self._case_modality(stored), is_2d=first.dimension == 2 or self.is_2d,
            file_ending=self.meta["file_ending"], channel_names=list(self.channel_names),
            nonfinite=self.nonfinite,
            meta={"label_source": str(label_path) if label_path else None, "dtype": str(stored),
                  "geometry_source": str(files["image"][0])},
        )

    def _case_modality(self, stored: np.dtype) -> str:
        if self.modality in ("other", "natural") and self._modality_override is None and self.is_2d:
            return "natural" if stored == np.uint8 else "other"
        return self.modality

