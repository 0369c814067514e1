"""What every reader returns: a :class:`DatasetSource` (case ids, class names, lazy per-case loading)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from ...errors import InputError
from ..cases import Case


class DatasetSource:
    """A dataset on disk, read lazily one case at a time.

    ``case_ids``: labelled (training) cases; ``test_case_ids``: cases without labels to predict (nnU-Net
    ``imagesTs``, a DICOM series, a single file; may be empty); ``labels``: class name -> id with
    ``background = 0``; ``num_classes``: foreground class count; ``modality``: ``"CT" | "MR" | "natural" | "other"``;
    ``split_file``: a ``splits.json`` shipped with the dataset (used by :meth:`make_split` unless overridden);
    ``test_sets``: named labelled test sets (set name -> case ids, e.g. PraNet's five polyp sets) that form the
    dataset's fixed test split and are reported one by one; empty when the test split is one unnamed set;
    ``warnings``: non-fatal findings for ``samadapt data check``; ``nonfinite``: the NaN/Inf policy each loaded
    :class:`Case` gets (``"error"`` or ``"zero"``). ``load(case_id)`` returns a :class:`Case`
    (``image`` C x Z x Y x X float32, ``label`` Z x Y x X or None) and raises ``InputError`` naming the file on
    bad input.
    """

    format: ClassVar[str] = "base"

    def __init__(self, root: str | Path, modality: str | None = None):
        self.root = Path(root)
        self.case_ids: list[str] = []
        self.test_case_ids: list[str] = []
        self.labels: dict[str, int] = {"background": 0}
        self.modality: str = modality or "other"
        self._modality_override = modality
        self.split_file: Path | None = None
        self.test_sets: dict[str, list[str]] = {}
        self.warnings: list[str] = []
        self.nonfinite: str = "error"

    # --- the interface ----------------------------------------------------------------------------------------
    def load(self, case_id: str) -> Case:
        raise NotImplementedError

    def case_files(self, case_id: str) -> dict[str, Any]:
        """``{"image": [paths], "label": path or None}`` for reports and error messages."""
        raise NotImplementedError

    # --- derived ----------------------------------------------------------------------------------------------
    @property
    def num_classes(self) -> int:
        """Number of foreground classes."""
        return sum(1 for v in self.labels.values() if v != 0)

    @property
    def class_names(self) -> list[str]:
        """Foreground class names ordered by id (index i is class id i + 1)."""
        return [k for k, v in sorted(self.labels.items(), key=lambda kv: kv[1]) if v != 0]

    def load_all(self, case_ids: list[str] | None = None) -> list[Case]:
        return [self.load(c) for c in (self.case_ids if case_ids is None else case_ids)]

    def make_split(self, **kwargs: Any):
        """:func:`samadapt.data.splits.make_split` over ``case_ids``, using the dataset's ``splits.json`` by default."""
        from ..splits import make_split

        kwargs.setdefault("split_file", self.split_file)
        return make_split(self.case_ids, **kwargs)

    def describe(self) -> dict[str, Any]:
        return {
            "format": self.format, "root": str(self.root), "num_cases": len(self.case_ids),
            "num_test_cases": len(self.test_case_ids), "labels": dict(self.labels), "modality": self.modality,
            "split_file": str(self.split_file) if self.split_file else None,
        }

    def __len__(self) -> int:
        return len(self.case_ids)

    def __repr__(self) -> str:
        return (f"{type(self).__name__}({str(self.root)!r}, cases={len(self.case_ids)}, "
                f"test_cases={len(self.test_case_ids)}, labels={self.labels})")

    def _check_id(self, case_id: str) -> None:
        if case_id not in self.case_ids and case_id not in self.test_case_ids:
            raise InputError(self.root, f"no case {case_id!r} (cases: {_preview(self.case_ids + self.test_case_ids)})")


# --- helpers shared by readers -----------------------------------------------------------------------------------
def _preview(items: list[str], n: int = 5) -> str:
    return ", ".join(items[:n]) + (f", ... ({len(items)} in all)" if len(items) > n else "")


def parse_labels(labels: Any, where: str | Path) -> dict[str, int]:
    """Validate a ``labels`` mapping (name -> int id): background 0 present, ids unique and consecutive 0..K."""
    if not isinstance(labels, dict) or not labels:
        raise InputError(where, "'labels' must be a non-empty mapping of class name -> integer id")
    out: dict[str, int] = {}
    for name, value in labels.items():
        if isinstance(value, (list, tuple)):
            raise InputError(where, f"label {name!r} is region-based ({value}); only integer class ids are supported")
        if isinstance(value, bool) or not isinstance(value, (int, float)) or int(value) != value:
            raise InputError(where, f"label {name!r} has non-integer id {value!r}")
        out[str(name)] = int(value)
    ids = sorted(out.values())
    if 0 not in ids:
        raise InputError(where, "labels must declare the background as id 0, e.g. {\"background\": 0, ...}")
    if len(set(ids)) != len(ids):
        raise InputError(where, f"label ids are not unique: {out}")
    if ids != list(range(len(ids))):
        raise InputError(where, f"label ids must be consecutive 0..K, got {ids}")
    if "ignore" in out:
        raise InputError(where, "the nnU-Net 'ignore' label is not supported; remove it or give it a class name")
    return out


def real_array(array: np.ndarray, where: str | Path, what: str) -> np.ndarray:
    """``array`` unchanged when it holds real numbers (bool, integer, float); else ``InputError`` naming ``where``
    (complex or text arrays would be cast to float32 silently or fail deep inside)."""
    if array.dtype.kind not in "biuf":
        raise InputError(where, f"{what} array has dtype {array.dtype}; expected real numbers (integer or float)")
    return array


def label_dtype(labels: dict[str, int]) -> type:
    return np.uint8 if max(labels.values()) < 256 else np.int32


def validate_label(label: np.ndarray, labels: dict[str, int], where: str | Path, declared_in: str) -> np.ndarray:
    """Check that ``label`` holds only declared integer ids; return it in a compact integer dtype."""
    if label.dtype.kind == "f":
        if not np.all(np.isfinite(label)) or not np.array_equal(label, np.round(label)):
            raise InputError(where, "label file holds non-integer values; expected integer class ids")
    elif label.dtype.kind not in "iub":
        raise InputError(where, f"label pixel type {label.dtype} is not an integer type")
    values = np.unique(label)
    allowed = set(labels.values())
    bad = [v for v in values.tolist() if int(v) not in allowed]
    if bad:
        raise InputError(where, f"label values {bad[:10]} not declared in {declared_in} (declared: {labels})")
    return label.astype(label_dtype(labels), copy=False)


_MR_NAMES = ("MR", "MRI", "T1", "T2", "FLAIR", "ADC", "DWI", "PD", "T1W", "T2W", "T1CE", "T1GD", "SWI", "DIXON")
_NATURAL_NAMES = ("RGB", "R", "G", "B", "RED", "GREEN", "BLUE", "NATURAL", "RESCALE_TO_0_1", "GRAY", "GREY")


def modality_from_channel_name(name: str) -> str:
    """nnU-Net channel name -> modality: ``CT`` -> CT; MR sequence names -> MR; RGB-like -> natural; else other."""
    key = str(name).strip().upper().replace("-", "").replace(" ", "_")
    if key == "CT" or key.startswith("CT_"):
        return "CT"
    if key in _MR_NAMES or key.startswith(("MR", "T1", "T2")):
        return "MR"
    if key in _NATURAL_NAMES:
        return "natural"
    return "other"


def guess_modality(array: np.ndarray, stored_dtype: np.dtype | None = None) -> str:
    """Modality of an undeclared image: 8-bit -> natural; integer data reaching below -500 -> CT (HU); else MR."""
    dtype = stored_dtype if stored_dtype is not None else array.dtype
    if dtype == np.uint8:
        return "natural"
    if array.size and float(array.min()) < -500:
        return "CT"
    return "MR" if array.shape[1] > 1 else "other"


def read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise InputError(path, "file not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise InputError(path, f"invalid JSON: {err}") from None


def optional_labels_file(root: Path) -> tuple[dict[str, int] | None, Path | None, dict]:
    """``labels.json`` or ``dataset.json`` beside a 2D folder / npz set: (labels or None, the file, its content)."""
    for name in ("labels.json", "dataset.json"):
        path = root / name
        if path.is_file():
            content = read_json(path)
            if isinstance(content, dict) and "labels" in content:
                return parse_labels(content["labels"], path), path, content
            if isinstance(content, dict) and all(isinstance(v, int) for v in content.values()):
                return parse_labels(content, path), path, {}
            raise InputError(path, "expected {\"labels\": {\"background\": 0, ...}} or a name -> id mapping")
    return None, None, {}
