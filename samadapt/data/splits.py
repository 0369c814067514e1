"""Train/val/test splits by case (never by slice), seeded; k-fold; explicit split files; few-shot slice subsets.

Rules of :func:`make_split`, in order of precedence:

1. ``split_file`` (JSON ``{"train": [...], "val": [...], "test": [...]}``; missing keys are empty lists; or
   nnU-Net's ``splits_final.json`` list of ``{"train", "val"}`` folds, picked with ``fold``) overrides everything.
   Every listed id must be a known case and no case may appear twice.
2. ``folds=k``: ``test_fraction`` of the cases is held out first (seeded), the rest is cut into ``k`` seeded folds;
   fold ``fold`` is the validation set and the other folds the training set.
3. Otherwise a seeded shuffle: ``round(test_fraction * n)`` test cases, ``round(val_fraction * n)`` validation
   cases, the rest for training. A non-zero fraction always gets at least one case while at least one case is left
   for training.
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence, TypeVar

from ..errors import ConfigError, InputError

T = TypeVar("T")


@dataclass
class Split:
    """Case ids per split plus how the split was made (recorded in the run manifest)."""

    train: list[str]
    val: list[str]
    test: list[str]
    source: str = "random"  # "random" | "kfold" | "file:<path>"
    seed: int | None = 0
    fold: int | None = None
    folds: int | None = None
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Split":
        return cls(**d)

    def __post_init__(self) -> None:
        seen: dict[str, str] = {}
        for name in ("train", "val", "test"):
            for cid in getattr(self, name):
                if cid in seen:
                    raise ConfigError(f"case {cid!r} is in both {seen[cid]} and {name}")
                seen[cid] = name


def _counts(n: int, val_fraction: float, test_fraction: float) -> tuple[int, int]:
    for name, f in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
        if not 0.0 <= f < 1.0:
            raise ConfigError(f"{name} must be in [0, 1), got {f}")
    if val_fraction + test_fraction >= 1.0:
        raise ConfigError(f"val_fraction + test_fraction must be < 1, got {val_fraction + test_fraction}")
    n_test = round(test_fraction * n)
    n_val = round(val_fraction * n)
    if test_fraction > 0 and n_test == 0 and n - n_val >= 2:
        n_test = 1
    if val_fraction > 0 and n_val == 0 and n - n_test >= 2:
        n_val = 1
    while n_test + n_val >= n and (n_test or n_val):
        if n_test >= n_val and n_test:
            n_test -= 1
        else:
            n_val -= 1
    return n_val, n_test


def make_split(case_ids: Sequence[str], val_fraction: float = 0.1, test_fraction: float = 0.2, seed: int = 0,
               split_file: str | Path | None = None, folds: int | None = None, fold: int | None = None) -> Split:
    """Split ``case_ids`` into train/val/test by case (see the module docstring for the rules)."""
    ids = list(dict.fromkeys(case_ids))
    if len(ids) != len(case_ids):
        raise ConfigError("case_ids holds duplicates")
    if split_file is not None:
        return split_from_file(split_file, ids, fold)
    if not ids:
        raise ConfigError("no cases to split")
    rng = random.Random(seed)
    order = sorted(ids)
    rng.shuffle(order)
    if folds is not None:
        if folds < 2:
            raise ConfigError(f"folds must be >= 2, got {folds}")
        if fold is None or not 0 <= fold < folds:
            raise ConfigError(f"fold must be in 0..{folds - 1}, got {fold}")
        _, n_test = _counts(len(ids), 0.0, test_fraction)
        test, rest = order[:n_test], order[n_test:]
        if len(rest) < folds:
            raise ConfigError(f"{len(rest)} cases cannot make {folds} folds")
        bounds = [math.floor(i * len(rest) / folds) for i in range(folds + 1)]
        val = rest[bounds[fold]:bounds[fold + 1]]
        train = rest[: bounds[fold]] + rest[bounds[fold + 1]:]
        return Split(sorted(train), sorted(val), sorted(test), "kfold", seed, fold, folds)
    n_val, n_test = _counts(len(ids), val_fraction, test_fraction)
    test = order[:n_test]
    val = order[n_test:n_test + n_val]
    train = order[n_test + n_val:]
    return Split(sorted(train), sorted(val), sorted(test), "random", seed)


def split_from_file(path: str | Path, case_ids: Sequence[str], fold: int | None = None) -> Split:
    """Read an explicit split (``{"train", "val", "test"}`` or nnU-Net's ``splits_final.json`` folds)."""
    path = Path(path)
    try:
        content = json.loads(path.read_text())
    except FileNotFoundError:
        raise InputError(path, "split file not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise InputError(path, f"invalid JSON: {err}") from None
    if isinstance(content, list):  # nnU-Net splits_final.json
        index = 0 if fold is None else fold
        if not 0 <= index < len(content) or not isinstance(content[index], dict):
            raise InputError(path, f"fold {index} not in this split file ({len(content)} folds)")
        content = content[index]
    if not isinstance(content, dict):
        raise InputError(path, "expected {\"train\": [...], \"val\": [...], \"test\": [...]}")
    unknown_keys = set(content) - {"train", "val", "test"}
    if unknown_keys:
        raise InputError(path, f"unknown keys {sorted(unknown_keys)}; expected train, val, test")
    parts: dict[str, list[str]] = {}
    for key in ("train", "val", "test"):
        value = content.get(key, [])
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise InputError(path, f"{key!r} must be a list of case ids")
        parts[key] = value
    known = set(case_ids)
    listed = parts["train"] + parts["val"] + parts["test"]
    missing = [c for c in listed if c not in known]
    if missing:
        raise InputError(path, f"lists unknown case ids {missing[:5]}")
    if len(set(listed)) != len(listed):
        dup = sorted({c for c in listed if listed.count(c) > 1})
        raise InputError(path, f"case ids listed twice: {dup[:5]}")
    if not parts["train"]:
        raise InputError(path, "the training list is empty")
    return Split(parts["train"], parts["val"], parts["test"], f"file:{path}", None, fold)


def fewshot_slices(slice_keys: Sequence[T], fraction_or_count: float | int, seed: int = 0) -> list[T]:
    """A seeded subset of labelled training slices, in their original order.

    A float in (0, 1] is a fraction (at least one slice); an int >= 1 a count (capped at the total).
    """
    n = len(slice_keys)
    if isinstance(fraction_or_count, bool):
        raise ConfigError("few-shot size must be a fraction or a count")
    if isinstance(fraction_or_count, int):
        if fraction_or_count < 1:
            raise ConfigError(f"few-shot count must be >= 1, got {fraction_or_count}")
        k = min(fraction_or_count, n)
    else:
        if not 0.0 < fraction_or_count <= 1.0:
            raise ConfigError(f"few-shot fraction must be in (0, 1], got {fraction_or_count}")
        k = max(1, round(fraction_or_count * n)) if n else 0
    chosen = sorted(random.Random(seed).sample(range(n), k))
    return [slice_keys[i] for i in chosen]
