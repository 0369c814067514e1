"""Prediction inputs without labels: a folder holding one DICOM series (``dicom``) or one image file (``file``).

Both yield a single test case (``test_case_ids == [case_id]``); predictions are written as NIfTI (DICOM input)
or in the input file's own format, with the input's spacing, origin and direction.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from ...errors import InputError
from .. import _io
from ..cases import IMAGE_2D_ENDINGS, VOLUME_ENDINGS, Case, file_ending, strip_ending
from . import READERS
from .base import DatasetSource, guess_modality

_DICOM_MODALITIES = {"CT": "CT", "MR": "MR", "PT": "other", "US": "other", "XA": "other", "CR": "other", "DX": "other"}


def dicom_series(folder: Path) -> list[str]:
    """Series instance UIDs of the DICOM files directly inside ``folder`` (SimpleITK/GDCM)."""
    import SimpleITK as sitk

    return list(sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder)))


@READERS.register("dicom")
class DicomSource(DatasetSource):
    """A folder holding exactly one DICOM series; several series raise ``InputError`` listing them."""

    format = "dicom"

    def __init__(self, root: str | Path, modality: str | None = None):
        super().__init__(root, modality)
        if not self.root.is_dir():
            raise InputError(self.root, "a DICOM input must be a folder holding one series")
        series = dicom_series(self.root)
        if not series:
            raise InputError(self.root, "no DICOM series found in this folder")
        if len(series) > 1:
            raise InputError(self.root, f"{len(series)} DICOM series found ({', '.join(series[:5])}); "
                                        "put each series in its own folder")
        self.series_uid = series[0]
        self.case_id = self.root.resolve().name or "dicom"
        self.test_case_ids = [self.case_id]

    def case_files(self, case_id: str) -> dict[str, Any]:
        import SimpleITK as sitk

        self._check_id(case_id)
        names = sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(self.root), self.series_uid)
        return {"image": [Path(n) for n in names], "label": None}

    def load(self, case_id: str) -> Case:
        import SimpleITK as sitk

        files = [str(p) for p in self.case_files(case_id)["image"]]
        reader = sitk.ImageSeriesReader()
        reader.SetFileNames(files)
        reader.MetaDataDictionaryArrayUpdateOn()
        try:
            image = reader.Execute()
        except RuntimeError as err:
            raise InputError(self.root, f"cannot read the DICOM series (unreadable or truncated file): "
                                        f"{str(err).strip().splitlines()[-1][:300]}") from None
        volume = _io.sitk_to_volume(image, str(self.root))
        tag = reader.GetMetaData(0, "0008|0060").strip() if reader.HasMetaDataKey(0, "0008|0060") else ""
        if self._modality_override is not None:
            modality = self._modality_override
        elif tag in _DICOM_MODALITIES:
            modality = _DICOM_MODALITIES[tag]
        else:
            modality = guess_modality(volume.array)
        self.modality = modality
        return Case(id=case_id, image=volume.array.astype(np.float32), label=None, spacing=volume.spacing,
                    origin=volume.origin, direction=volume.direction, source=str(self.root), modality=modality,
                    is_2d=False, file_ending=".nii.gz", meta={"dicom_modality": tag, "files": len(files)})


@READERS.register("file")
class FileSource(DatasetSource):
    """One image file (NIfTI, NRRD, MHA, or a 2D picture) as a single test case."""

    format = "file"

    def __init__(self, root: str | Path, modality: str | None = None):
        super().__init__(root, modality)
        if not self.root.is_file():
            raise InputError(self.root, "file not found")
        ending = file_ending(self.root)
        if ending not in VOLUME_ENDINGS + IMAGE_2D_ENDINGS:
            raise InputError(self.root, f"unsupported file type {ending!r} (expected one of "
                                        f"{', '.join(VOLUME_ENDINGS + IMAGE_2D_ENDINGS)})")
        self.ending = ending
        self.case_id = strip_ending(self.root)
        self.test_case_ids = [self.case_id]

    def case_files(self, case_id: str) -> dict[str, Any]:
        self._check_id(case_id)
        return {"image": [self.root], "label": None}

    def load(self, case_id: str) -> Case:
        self._check_id(case_id)
        if self.ending in IMAGE_2D_ENDINGS:
            picture = _io.read_picture(self.root)
            volume = _io.picture_to_volume(picture)
            stored = picture.dtype
        else:
            volume = _io.read_volume(self.root)
            stored = volume.array.dtype
        modality = self._modality_override or guess_modality(volume.array, stored)
        self.modality = modality
        two_d = volume.dimension == 2
        return Case(id=case_id, image=volume.array.astype(np.float32), label=None, spacing=volume.spacing,
                    origin=volume.origin, direction=volume.direction, source=str(self.root), modality=modality,
                    is_2d=two_d, file_ending=".png" if self.ending in IMAGE_2D_ENDINGS else self.ending,
                    meta={"dtype": str(stored), "geometry_source": str(self.root)})
