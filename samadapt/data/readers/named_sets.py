"""A dataset made of one labelled training folder plus named test folders, each a 2D picture folder read by
:class:`~.folder2d.Folder2DSource`: the shared part of the PraNet polyp and ISIC-2018 readers.

Case ids: a training picture keeps its file stem; a picture of test set ``NAME`` is ``NAME__stem`` (stems repeat
across sets: PraNet's CVC-ClinicDB numbers its pictures 1..612 in both the training and the test folder).
``test_sets`` maps each set name to its case ids. :meth:`NamedSetsSource.make_split` keeps the sets apart: the
validation split is carved out of the training folder (``val_fraction`` or ``folds``, seeded), the test split is
every case of every named test set, and ``test_fraction`` is ignored; an explicit ``split_file`` (or a
``splits.json`` beside the sets) overrides this as for any reader. A test folder holding pictures but no masks
gives cases to predict (``test_case_ids``).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from ...errors import ConfigError, InputError
from ..cases import Case
from ..splits import Split, make_split
from .base import DatasetSource
from .folder2d import Folder2DSource

SEPARATOR = "__"


class NamedSetsSource(DatasetSource):
    """``train`` (labelled) and ``tests`` (set name -> folder) as one dataset; see the module docstring."""

    format = "named_sets"

    def __init__(self, root: str | Path, modality: str | None, train: Folder2DSource,
                 tests: dict[str, Folder2DSource]):
        super().__init__(root, modality)
        if not train.case_ids:
            raise InputError(train.images_dir, "the training folder has no labelled pictures (no masks folder?)")
        self.labels, self.modality = dict(train.labels), train.modality
        self._parts: dict[str, tuple[Folder2DSource, str]] = {stem: (train, stem) for stem in train.case_ids}
        self.case_ids = list(train.case_ids)
        self.train_case_ids = list(train.case_ids)
        for name, part in tests.items():
            if part.labels != train.labels:
                raise InputError(part.root, f"test set {name!r} declares labels {part.labels}, the training folder "
                                            f"{train.labels}")
            ids = [f"{name}{SEPARATOR}{stem}" for stem in part.case_ids + part.test_case_ids]
            self._parts.update({cid: (part, cid[len(name) + len(SEPARATOR):]) for cid in ids})
            labelled = ids[:len(part.case_ids)]
            if labelled:
                self.test_sets[name] = labelled
                self.case_ids += labelled
            self.test_case_ids += ids[len(part.case_ids):]
        split = self.root / "splits.json"
        self.split_file = split if split.is_file() else None

    def case_files(self, case_id: str) -> dict[str, Any]:
        self._check_id(case_id)
        part, stem = self._parts[case_id]
        return part.case_files(stem)

    def load(self, case_id: str) -> Case:
        self._check_id(case_id)
        part, stem = self._parts[case_id]
        return dataclasses.replace(part.load(stem), id=case_id)

    def make_split(self, **kwargs: Any) -> Split:
        """Validation from the training folder, test = the named test sets (``test_fraction`` ignored), unless a
        split file is given or shipped."""
        kwargs.setdefault("split_file", self.split_file)
        if kwargs["split_file"] is not None:
            return make_split(self.case_ids, **kwargs)
        kwargs["test_fraction"] = 0.0
        split = make_split(self.train_case_ids, **kwargs)
        test = [cid for ids in self.test_sets.values() for cid in ids]
        if not test:
            raise ConfigError(f"{self.root}: no labelled test set")
        return Split(split.train, split.val, test, split.source, split.seed, split.fold, split.folds,
                     extra={"test_sets": {name: len(ids) for name, ids in self.test_sets.items()}})

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "test_sets": {name: len(ids) for name, ids in self.test_sets.items()}}

