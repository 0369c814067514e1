"""Dataset readers found by name in ``READERS`` and :func:`open_dataset`, which picks one by looking at the path.

Built-in readers: ``nnunet`` (nnU-Net v2 raw), ``folder2d`` (images/ + masks/), ``pranet`` (PraNet's polyp
TrainDataset/ + TestDataset/<set>/), ``isic2018`` (the ISIC-2018 Task 1 folders), ``synapse`` (TransUNet's
train_npz/ + test_vol_h5/ + lists_Synapse/, as SAMed and H-SAM use it), ``prostate-site`` / ``prostate-sites``
(the six-site prostate MRI folders of SAML/MaxStyle/DeSAM), ``npz`` (MedSAM-style), ``dicom`` (a folder
holding one series), ``volumes`` (a folder of unlabelled NIfTI/NRRD/MHA files, e.g. nnU-Net's ``imagesTs``) and
``file`` (one NIfTI/NRRD/MHA/PNG file). Each reader is a :class:`DatasetSource` subclass that declares its name in
``format`` and registers with ``@READERS.register``, third-party ones too (entry-point group ``samadapt.readers``);
the class is built as ``cls(path, modality=None)``.
"""

from __future__ import annotations

import os
from pathlib import Path

from ...errors import InputError
from ...registry import Registry
from .base import DatasetSource

READERS: Registry[type[DatasetSource]] = Registry("reader", "samadapt.readers", DatasetSource, name_attr="format")
"""Every reader class by its ``format``."""

from . import folder2d, nnunet, npz, single  # noqa: E402,F401  (register the built-ins)
from . import isic, pranet, prostate, synapse  # noqa: E402,F401
from .isic import is_isic2018_root  # noqa: E402
from .synapse import is_synapse_root  # noqa: E402
from .pranet import is_pranet_root  # noqa: E402
from .prostate import is_prostate_root, is_prostate_site  # noqa: E402
from .folder2d import IMAGE_DIRS, find_subdir, has_pictures  # noqa: E402
from ..cases import IMAGE_2D_ENDINGS, VOLUME_ENDINGS, file_ending  # noqa: E402


def detect_format(path: str | os.PathLike) -> str:
    """The reader name for ``path``: nnunet (dataset.json), pranet, isic2018, synapse (train_npz/, test_vol_h5/),
    prostate-site / prostate-sites, folder2d (images/), npz, volumes, dicom, file."""
    path = Path(path)
    if path.is_file():
        ending = file_ending(path)
        if ending == ".npz":
            return "npz"
        if ending in VOLUME_ENDINGS + IMAGE_2D_ENDINGS:
            return "file"
        raise InputError(path, f"cannot tell the format of a {ending or 'suffix-less'} file")
    if not path.is_dir():
        raise InputError(path, "not found")
    if (path / "dataset.json").is_file() and ((path / "labelsTr").is_dir() or (path / "imagesTr").is_dir()):
        return "nnunet"
    if is_pranet_root(path):
        return "pranet"
    if is_isic2018_root(path):
        return "isic2018"
    if is_synapse_root(path):
        return "synapse"
    if is_prostate_site(path):
        return "prostate-site"
    if is_prostate_root(path):
        return "prostate-sites"
    if find_subdir(path, IMAGE_DIRS) is not None or has_pictures(path):
        return "folder2d"
    if any(p.suffix == ".npz" for p in path.iterdir()):
        return "npz"
    if any(p.is_file() and file_ending(p) in VOLUME_ENDINGS for p in path.iterdir()):
        return "volumes"
    from .single import dicom_series

    if dicom_series(path):
        return "dicom"
    raise InputError(path, "cannot tell the dataset format: expected an nnU-Net raw folder (dataset.json, imagesTr/, "
                           "labelsTr/), a 2D folder (images/ + masks/), .npz files, a folder of NIfTI/NRRD/MHA "
                           "volumes or one DICOM series")


def open_dataset(path: str | os.PathLike, format: str = "auto", modality: str | None = None,
                 nonfinite: str = "error") -> DatasetSource:
    """Open a dataset with the reader named ``format`` (``"auto"``: :func:`detect_format`).

    ``modality`` (``"CT"``, ``"MR"``, ``"natural"``, ``"other"``) overrides what the reader infers; ``nonfinite``
    says what loading does with NaN/Inf image values (``"error"``: ``InputError`` naming file, case and count;
    ``"zero"``: replaced with 0, the count kept in ``case.meta["nonfinite_replaced"]``). Returns a
    :class:`DatasetSource` with ``case_ids``, ``test_case_ids``, ``labels``, ``num_classes``, ``modality``,
    ``split_file`` and ``load(case_id) -> Case``. Bad input raises ``InputError`` naming the file.
    """
    if nonfinite not in ("error", "zero"):
        raise InputError(path, f"nonfinite={nonfinite!r}: expected 'error' or 'zero'")
    name = detect_format(path) if format == "auto" else format
    source = READERS.get(name)(Path(path), modality=modality)
    source.nonfinite = nonfinite
    return source


def load_case(path: str | os.PathLike, format: str = "auto", modality: str | None = None):
    """The single case of a one-case input (a NIfTI/NRRD/MHA/PNG file, a DICOM folder, one .npz file)."""
    source = open_dataset(path, format, modality)
    ids = source.case_ids + source.test_case_ids
    if len(ids) != 1:
        raise InputError(path, f"expected one case, found {len(ids)}")
    return source.load(ids[0])


__all__ = ["READERS", "DatasetSource", "detect_format", "load_case", "open_dataset"]
