"""Atomic file writes: write to a temporary name in the same folder, then rename (nothing half-written)."""

from __future__ import annotations

import json
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator


def _ending(name: str) -> str:
    """The file ending with double endings (``.nii.gz``) kept whole, so format-by-extension writers work."""
    parts = name.split(".")
    if len(parts) > 2 and parts[-1] in ("gz", "bz2", "xz"):
        return "." + ".".join(parts[-2:])
    return "." + parts[-1] if len(parts) > 1 else ""


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` (same ending); on success it is renamed onto ``path``, on any error
    (or interruption) removed, so the destination never holds a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=f".part{_ending(path.name)}", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    finally:
        tmp_path.unlink(missing_ok=True)


def atomic_write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def atomic_write_json(path: str | Path, data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, default=str) + "\n")
