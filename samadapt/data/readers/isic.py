"""The ISIC-2018 lesion boundary segmentation (Task 1) download, read as is::

    ROOT/ISIC2018_Task1-2_Training_Input/ISIC_0000000.jpg      ROOT/ISIC2018_Task1_Training_GroundTruth/
    ROOT/ISIC2018_Task1-2_Validation_Input/                     ROOT/ISIC2018_Task1_Validation_GroundTruth/
    ROOT/ISIC2018_Task1-2_Test_Input/                           ROOT/ISIC2018_Task1_Test_GroundTruth/

Masks are ``ISIC_xxxxxxx_segmentation.png`` holding {0, 255}; the pairing, picture reading and checks are those
of :mod:`.folder2d` (the archive's ``LICENSE.txt``/``ATTRIBUTION.txt`` are not pictures and are skipped). The
training folders are required; the official validation and test folders, where present, are the named test sets
``validation`` and ``test`` (without their ground-truth folder: cases to predict). Our own validation split, used
for checkpoint selection, is carved out of the training folder (:mod:`.named_sets`).
"""

from __future__ import annotations

from pathlib import Path

from ...errors import InputError
from . import READERS
from .folder2d import Folder2DSource
from .named_sets import NamedSetsSource

PHASES = {"Training": None, "Validation": "validation", "Test": "test"}  # folder phase -> test set name


def input_dir(root: Path, phase: str) -> Path:
    """``ISIC2018_Task1-2_<phase>_Input`` (or the Task 1 only ``ISIC2018_Task1_<phase>_Input``) under ``root``."""
    for name in (f"ISIC2018_Task1-2_{phase}_Input", f"ISIC2018_Task1_{phase}_Input"):
        if (root / name).is_dir():
            return root / name
    return root / f"ISIC2018_Task1-2_{phase}_Input"


def ground_truth_dir(root: Path, phase: str) -> Path:
    return root / f"ISIC2018_Task1_{phase}_GroundTruth"


def is_isic2018_root(path: Path) -> bool:
    """Whether ``path`` holds the ISIC-2018 Task 1 training input folder."""
    return input_dir(path, "Training").is_dir()


@READERS.register
class ISIC2018Source(NamedSetsSource):
    """Reader of the ISIC-2018 Task 1 layout (see module docstring)."""

    format = "isic2018"

    def __init__(self, root: str | Path, modality: str | None = None):
        root = Path(root)
        images, masks = input_dir(root, "Training"), ground_truth_dir(root, "Training")
        for folder in (images, masks):
            if not folder.is_dir():
                raise InputError(folder, "not found: expected the ISIC-2018 Task 1 layout "
                                         "(ISIC2018_Task1-2_Training_Input + ISIC2018_Task1_Training_GroundTruth)")
        train = Folder2DSource(root, modality, images_dir=images, masks_dir=masks)
        tests = {}
        for phase, name in PHASES.items():
            if name is not None and input_dir(root, phase).is_dir():
                gt = ground_truth_dir(root, phase)
                tests[name] = Folder2DSource(root, modality, images_dir=input_dir(root, phase),
                                             masks_dir=gt if gt.is_dir() else None)
        super().__init__(root, modality, train, tests)


__all__ = ["ISIC2018Source", "is_isic2018_root"]
