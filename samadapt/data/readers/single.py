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

    shown = sitk.ProcessObject.GetGlobalWarningDisplay()
    sitk.ProcessObject.SetGlobalWarningDisplay(False)  # "No Series were found" is an answer, not a warning
    try:
        return list(sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder)))
    finally:
        sitk.ProcessObject.SetGlobalWarningDisplay(shown)


@READERS.register
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
        members = {Path(n).name for n in self._series_files(series[0])}
        strays = sorted(p.name for p in self.root.iterdir() if p.is_file() and p.name not in members
                        and p.suffix.lower() in (".dcm", ".ima"))
        if strays:  # GDCM leaves an unreadable or truncated slice out of the series without a word
            raise InputError(self.root / strays[0], f"not part of the DICOM series {series[0]} of this folder (an "
                                                    f"unreadable or truncated file?); {len(strays)} such file(s): "
                                                    f"{', '.join(strays[:5])}")
        self.case_id = self.root.resolve().name or "dicom"
        self.test_case_ids = [self.case_id]

    def _series_files(self, series_uid: str) -> list[str]:
        import SimpleITK as sitk

        return list(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(self.root), series_uid))

    def case_files(self, case_id: str) -> dict[str, Any]:
        self._check_id(case_id)
        return {"image": [Path(n) for n in self._series_files(self.series_uid)], "label": None}

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
                    is_2d=False, file_ending=".nii.gz",
                    nonfinite=self.nonfinite, meta={"dicom_modality": tag, "files": len(files)})


@READERS.register
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
                    nonfinite=self.nonfinite,
                    meta={"dtype": str(stored), "geometry_source": str(self.root)})


@READERS.register
class VolumeFolderSource(DatasetSource):
    """A folder of unlabelled volumes to predict (NIfTI/NRRD/MHA), e.g. an nnU-Net ``imagesTs`` folder.

    When every file name ends in ``_0000``-style channel suffixes, files are grouped into multi-channel cases as in
    nnU-Net (``case_0000.nii.gz``, ``case_0001.nii.gz``); otherwise each file is one single-channel case.
    """

    format = "volumes"

    def __init__(self, root: str | Path, modality: str | None = None):
        super().__init__(root, modality)
        if not self.root.is_dir():
            raise InputError(self.root, "not a folder")
        files = sorted(p for p in self.root.iterdir()
                       if p.is_file() and not p.name.startswith(".") and file_ending(p) in VOLUME_ENDINGS)
        if not files:
            raise InputError(self.root, f"no volumes ({', '.join(VOLUME_ENDINGS)}) in this folder")
        stems = [strip_ending(p) for p in files]
        channelled = all(len(s) > 5 and s[-5] == "_" and s[-4:].isdigit() for s in stems)
        self.files: dict[str, list[Path]] = {}
        for p, s in zip(files, stems):
            self.files.setdefault(s[:-5] if channelled else s, []).append(p)
        for cid, paths in self.files.items():
            if channelled and strip_ending(paths[0])[-4:] != "0000":
                raise InputError(paths[0], f"case {cid!r} has no _0000 channel file")
        self.test_case_ids = sorted(self.files)

    def case_files(self, case_id: str) -> dict[str, Any]:
        self._check_id(case_id)
        return {"image": list(self.files[case_id]), "label": None}

    def load(self, case_id: str) -> Case:
        paths = self.case_files(case_id)["image"]
        volumes = [_io.read_volume(p) for p in paths]
        for path, vol in zip(paths[1:], volumes[1:]):
            problem = _io.same_geometry(volumes[0], vol)
            if problem:
                raise InputError(path, f"channel {problem}")
        first = volumes[0]
        image = np.concatenate([v.array for v in volumes], axis=0)
        modality = self._modality_override or guess_modality(image, first.array.dtype)
        self.modality = modality
        return Case(id=case_id, image=image.astype(np.float32), label=None, spacing=first.spacing,
                    origin=first.origin, direction=first.direction, source=str(paths[0]), modality=modality,
                    is_2d=first.dimension == 2, file_ending=file_ending(paths[0]),
                    nonfinite=self.nonfinite,
                    meta={"dtype": str(first.array.dtype), "geometry_source": str(paths[0])})
