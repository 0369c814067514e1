"""Atomic file writes, stale-temporary cleanup, output-folder checks and the run-folder lock.

A file is written to a hidden temporary name in its own folder, then renamed onto its name, so a reader never
meets a half-written file. The temporary name carries the writer's process id (``.NAME.PID-TOKEN.partENDING``):
:func:`clean_stale_parts` removes the ones whose process no longer runs (left by a kill -9) and leaves live
writers' files alone. Files are created by the writer and given the permissions the user's umask gives a new file.
"""

from __future__ import annotations

import json
import os
import re
import secrets
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from .errors import InputError

_PART = re.compile(r"^\..+\.(\d+)-[0-9a-f]{8}\.part(\.[^/]*)?$")


def _ending(name: str) -> str:
    """The file ending with double endings (``.nii.gz``) kept whole, so format-by-extension writers work."""
    parts = name.split(".")
    if len(parts) > 2 and parts[-1] in ("gz", "bz2", "xz"):
        return "." + ".".join(parts[-2:])
    return "." + parts[-1] if len(parts) > 1 else ""


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` (same ending; not yet created); on success it is renamed onto
    ``path``, on any error (or interruption) removed, so the destination never holds a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp_path = path.parent / f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}.part{_ending(path.name)}"
    try:
        yield tmp_path
        os.chmod(tmp_path, 0o666 & ~_umask())  # some writers (safetensors) create files as 0600
        os.replace(tmp_path, path)
    finally:
        tmp_path.unlink(missing_ok=True)


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def atomic_write_json(path: str | Path, data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, default=str) + "\n")


def _running(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True  # exists (another user's) or unknown: keep its files
    return True


def clean_stale_parts(folder: str | Path, recursive: bool = True) -> list[Path]:
    """Remove the temporary files of :func:`atomic_path` whose writing process is gone; returns them."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    removed = []
    for path in (folder.rglob(".*.part*") if recursive else folder.glob(".*.part*")):
        match = _PART.match(path.name)
        if match and path.is_file() and not _running(int(match.group(1))):
            path.unlink(missing_ok=True)
            removed.append(path)
    return removed


def check_output_dir(path: str | Path) -> Path:
    """Raise ``InputError`` unless ``path`` is (or can be created as) a writable folder; creates nothing."""
    path = Path(path)
    if str(path).strip() == "":
        raise InputError(repr(str(path)), "empty output folder name")
    if path.exists() and not path.is_dir():
        raise InputError(path, "exists and is not a folder")
    probe = path
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if not probe.is_dir():
        raise InputError(path, f"cannot create the folder: {probe} is not a folder")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise InputError(path, f"not writable (no write permission on {probe})")
    return path


class FolderLock:
    """An exclusive lock on a folder (``.lock`` inside it, held with ``flock``; the OS drops it when the process
    dies, so a kill -9 never leaves the folder locked). A second holder gets an ``InputError`` naming the folder
    and the process that holds it."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self.path = self.folder / ".lock"
        self._fd: int | None = None

    def acquire(self) -> "FolderLock":
        self.folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            import fcntl

            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except ImportError:  # not a POSIX system: no locking available
            pass
        except OSError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise InputError(self.folder, f"another samadapt process (pid {holder}) is writing to this folder; "
                                          "wait for it to finish or choose another --out") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing drops the flock
            self._fd = None

    def __enter__(self) -> "FolderLock":
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()
