"""The Synapse multi-organ CT layout of TransUNet, SAMed and H-SAM, read as is (no conversion)::

    ROOT/train_npz/case0005_slice000.npz      one axial training slice: ``image`` H x W, ``label`` H x W
    ROOT/test_vol_h5/case0001.npy.h5          one test volume: datasets ``image`` Z x H x W, ``label`` Z x H x W
    ROOT/lists_Synapse/train.txt              training slice names, one per line (``case0005_slice000``)
    ROOT/lists_Synapse/test_vol.txt           test volume names (``case0001``)

``lists_Synapse`` may also be ``ROOT/lists/lists_Synapse`` (the repositories' own place). Without it every file of
``train_npz``/``test_vol_h5`` is used, with a warning; a listed name without its file is an error naming the list.
``SynapseSource(root, train_list="train_220.txt")`` reads another training list (H-SAM's 10 % file).

Case ids are the names in the lists: training slices are 2D cases (``1 x 1 x H x W``), test volumes 3D cases. The
split keeps them apart: validation is carved out of the training *cases* (all slices of a patient go to the same
side; ``val_fraction``, seeded), the test split is ``test_vol`` (named test set ``test_vol``), and
``test_fraction`` is ignored; an explicit split file overrides this as for any reader.

Values: the files hold TransUNet's preprocessed data: CT clipped to [-125, 275] HU and scaled to [0, 1]. Read them
with ``data.intensity_mode=none`` (``auto`` would rescale each case to its own percentiles, modality being
``other``). Labels: the 8 organs as remapped by TransUNet (:data:`SYNAPSE_LABELS`), unless a ``labels.json`` in
ROOT says otherwise. The files carry no voxel spacing: cases get spacing 1, so distances are in voxels, the unit
SAMed and H-SAM report (the reader's ``warnings`` say so).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np

from ...errors import ConfigError, InputError
from ..cases import Case
from ..splits import Split, make_split
from . import READERS
from .base import DatasetSource, optional_labels_file, real_array, validate_label
from .npz import _get, _open_npz

SYNAPSE_LABELS: dict[str, int] = {
    "background": 0, "spleen": 1, "right_kidney": 2, "left_kidney": 3, "gallbladder": 4, "liver": 5,
    "stomach": 6, "aorta": 7, "pancreas": 8,
}
"""TransUNet's label ids of the preprocessed Synapse files (as SAMed's and H-SAM's test scripts name them)."""

TRAIN_DIR, TEST_DIR, LISTS_DIR = "train_npz", "test_vol_h5", "lists_Synapse"
TEST_SET = "test_vol"
_SLICE = re.compile(r"^(?P<case>.+?)_slice\d+$")


def is_synapse_root(path: Path) -> bool:
    """Whether ``path`` holds ``train_npz/`` or ``test_vol_h5/``."""
    return (path / TRAIN_DIR).is_dir() or (path / TEST_DIR).is_dir()


def _lists_dir(root: Path) -> Path | None:
    for folder in (root / LISTS_DIR, root / "lists" / LISTS_DIR):
        if folder.is_dir():
            return folder
    return None


def _read_list(path: Path) -> list[str]:
    try:
        names = [line.strip() for line in path.read_text().splitlines()]
    except (OSError, UnicodeDecodeError) as err:
        raise InputError(path, f"cannot read the list: {err}") from None
    names = [n for n in names if n]
    if len(set(names)) != len(names):
        dup = next(n for n in names if names.count(n) > 1)
        raise InputError(path, f"lists {dup!r} twice")
    return names


def _listed(root: Path, lists: Path | None, list_name: str, folder: str, ending: str) -> dict[str, Path]:
    """Name -> file for the names of ``lists/list_name`` (or every ``*ending`` file of ``folder`` without lists)."""
    found = sorted(p for p in (root / folder).glob(f"*{ending}") if not p.name.startswith("."))
    files = {p.name[: -len(ending)]: p for p in found}
    if lists is None or not (lists / list_name).is_file():
        return files
    names = _read_list(lists / list_name)
    missing = [n for n in names if n not in files]
    if missing:
        example = root / folder / (missing[0] + ending)
        raise InputError(lists / list_name, f"{len(missing)} listed name(s) have no file in {root / folder}: "
                                            f"{', '.join(missing[:3])} (expected e.g. {example})")
    return {n: files[n] for n in names}


def _read_h5(path: Path) -> tuple[np.ndarray, np.ndarray | None]:
    import h5py

    try:
        with h5py.File(path, "r") as f:
            if "image" not in f:
                raise InputError(path, f"no 'image' dataset (found {sorted(f.keys())})")
            image = np.asarray(f["image"][()])
            label = np.asarray(f["label"][()]) if "label" in f else None
    except OSError as err:
        raise InputError(path, f"cannot read HDF5 (unreadable or truncated file): {err}") from None
    return image, label


@READERS.register
class SynapseSource(DatasetSource):
    """Reader of the Synapse ``train_npz`` / ``test_vol_h5`` / ``lists_Synapse`` layout (see module docstring)."""

    format = "synapse"

    def __init__(self, root: str | Path, modality: str | None = None, train_list: str = "train.txt",
                 test_list: str = "test_vol.txt"):
        super().__init__(root, modality)
        if not is_synapse_root(self.root):
            raise InputError(self.root, f"not the Synapse layout: expected {TRAIN_DIR}/ (*.npz slices) and/or "
                                        f"{TEST_DIR}/ (*.npy.h5 volumes)")
        lists = _lists_dir(self.root)
        for name, default in ((train_list, "train.txt"), (test_list, "test_vol.txt")):
            if name != default and (lists is None or not (lists / name).is_file()):
                raise InputError((lists or self.root / LISTS_DIR) / name, "list file not found")
        if lists is None:
            self.warnings.append(f"no {LISTS_DIR}/ folder: every file of {TRAIN_DIR}/ and {TEST_DIR}/ is used")
        self._train = _listed(self.root, lists, train_list, TRAIN_DIR, ".npz")
        self._test = _listed(self.root, lists, test_list, TEST_DIR, ".npy.h5")
        if not self._train and not self._test:
            raise InputError(self.root, f"no training slices in {TRAIN_DIR}/ and no test volumes in {TEST_DIR}/")
        clash = sorted(set(self._train) & set(self._test))
        if clash:
            raise InputError(self.root, f"names in both the training and the test list: {', '.join(clash[:3])}")
        labels, self.labels_file, _ = optional_labels_file(self.root)
        self.labels = labels or dict(SYNAPSE_LABELS)
        self.modality = modality or "other"
        self.train_case_ids = list(self._train)
        self.case_ids = self.train_case_ids + list(self._test)
        if self._test:
            self.test_sets[TEST_SET] = list(self._test)
        split = self.root / "splits.json"
        self.split_file = split if split.is_file() else None
        self.warnings.append("Synapse files carry no voxel spacing: spacing 1, so distances are in voxels")

    def case_files(self, case_id: str) -> dict[str, Any]:
        self._check_id(case_id)
        path = self._train.get(case_id) or self._test[case_id]
        return {"image": [path], "label": path}

    def load(self, case_id: str) -> Case:
        self._check_id(case_id)
        declared = str(self.labels_file or "SYNAPSE_LABELS (TransUNet's 8 organs)")
        if case_id in self._train:
            path = self._train[case_id]
            with _open_npz(path) as npz:
                image = _get(npz, path, ("image",), True)
                label = _get(npz, path, ("label",), True)
            if image.ndim != 2 or label.shape != image.shape:
                raise InputError(path, f"expected 2D 'image' and 'label' of one size, got {image.shape} and "
                                       f"{label.shape}")
            image, label, two_d = image[None, None], label[None], True
        else:
            path = self._test[case_id]
            image, label = _read_h5(path)
            if label is None:
                raise InputError(path, "no 'label' dataset")
            if image.ndim != 3 or label.shape != image.shape:
                raise InputError(path, f"expected 3D 'image' and 'label' (Z x H x W) of one size, got {image.shape} "
                                       f"and {label.shape}")
            image, two_d = image[None], False
        real_array(image, path, "image")
        label = validate_label(label, self.labels, path, declared)
        return Case(id=case_id, image=image.astype(np.float32), label=label, spacing=(1.0, 1.0, 1.0),
                    source=str(path), modality=self.modality, is_2d=two_d,
                    file_ending=".png" if two_d else ".nii.gz", nonfinite=self.nonfinite,
                    meta={"label_source": str(path), "patient": _patient(case_id)})

    def make_split(self, **kwargs: Any) -> Split:
        """Validation from the training patients (whole patients), test = ``test_vol`` (``test_fraction`` ignored),
        unless a split file is given or shipped."""
        kwargs.setdefault("split_file", self.split_file)
        if kwargs["split_file"] is not None:
            return make_split(self.case_ids, **kwargs)
        if not self.train_case_ids:
            raise ConfigError(f"{self.root}: no training slices in {TRAIN_DIR}/")
        if not self._test:
            raise ConfigError(f"{self.root}: no test volumes in {TEST_DIR}/")
        kwargs["test_fraction"] = 0.0
        patients = list(dict.fromkeys(_patient(cid) for cid in self.train_case_ids))
        by_patient = make_split(patients, **kwargs)
        val_patients = set(by_patient.val)
        train = [cid for cid in self.train_case_ids if _patient(cid) not in val_patients]
        val = [cid for cid in self.train_case_ids if _patient(cid) in val_patients]
        return Split(train, val, list(self._test), by_patient.source, by_patient.seed, by_patient.fold,
                     by_patient.folds, extra={"test_sets": {TEST_SET: len(self._test)},
                                              "val_patients": sorted(val_patients)})

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "test_sets": {name: len(ids) for name, ids in self.test_sets.items()}}


def _patient(case_id: str) -> str:
    """``case0005_slice012`` -> ``case0005``; a volume name is its own patient."""
    match = _SLICE.match(case_id)
    return match.group("case") if match else case_id


__all__ = ["SYNAPSE_LABELS", "SynapseSource", "is_synapse_root"]
