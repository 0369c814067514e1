"""The PraNet polyp layout, read as is (the split HeterSAM, ProMISe and most polyp papers use)::

    ROOT/TrainDataset/{images,masks}/*.png          Kvasir 900 + CVC-ClinicDB 550 (PraNet ships image/ and mask/)
    ROOT/TestDataset/CVC-300/{images,masks}/*.png    and CVC-ClinicDB, CVC-ColonDB, ETIS-LaribPolypDB, Kvasir

Each folder is a 2D picture folder (:mod:`.folder2d`: any of its folder names, picture formats and mask
suffixes); every sub-folder of ``TestDataset`` is a named test set (:data:`PRANET_TEST_SETS` are the usual five;
others, or a subset of them, are read the same way), so that one report scores each set on its own. The masks are
binary; grey levels in them (Kvasir's once-JPEG masks) are thresholded at 128, as PraNet's loaders binarise them.
Case ids, split and test sets: :mod:`.named_sets` (training pictures keep their stem, test pictures are
``SET__stem``; validation is carved out of ``TrainDataset``, the test split is the union of the test sets).
"""

from __future__ import annotations

from pathlib import Path

from ...errors import InputError
from . import READERS
from .folder2d import Folder2DSource
from .named_sets import NamedSetsSource

PRANET_TEST_SETS = ("CVC-300", "CVC-ClinicDB", "CVC-ColonDB", "ETIS-LaribPolypDB", "Kvasir")
TRAIN_DIR, TEST_DIR = "TrainDataset", "TestDataset"


def is_pranet_root(path: Path) -> bool:
    """Whether ``path`` holds ``TrainDataset/`` and ``TestDataset/`` folders."""
    return (path / TRAIN_DIR).is_dir() and (path / TEST_DIR).is_dir()


@READERS.register
class PraNetSource(NamedSetsSource):
    """Reader of the PraNet polyp layout (see module docstring); ``test_sets`` holds one entry per test folder."""

    format = "pranet"

    def __init__(self, root: str | Path, modality: str | None = None):
        root = Path(root)
        if not is_pranet_root(root):
            raise InputError(root, f"not the PraNet polyp layout: expected {TRAIN_DIR}/ (images + masks) and "
                                   f"{TEST_DIR}/<set>/ (images + masks)")
        train = Folder2DSource(root / TRAIN_DIR, modality, threshold_masks=True)
        folders = sorted(p for p in (root / TEST_DIR).iterdir() if p.is_dir() and not p.name.startswith("."))
        if not folders:
            raise InputError(root / TEST_DIR, f"no test set folders (expected e.g. {', '.join(PRANET_TEST_SETS)})")
        tests = {p.name: Folder2DSource(p, modality, threshold_masks=True) for p in folders}
        super().__init__(root, modality, train, tests)


__all__ = ["PRANET_TEST_SETS", "PraNetSource", "is_pranet_root"]
