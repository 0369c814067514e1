"""Reading users' weight files, and where downloaded weights live.

``read_torch_checkpoint`` reads a ``.pth``/``.pt`` file safely and strips the wrappers users' checkpoints come in
(``model``/``state_dict`` entries, ``module.`` from DDP, ``_orig_mod.`` from ``torch.compile``); the backbones load
the result through ``samadapt.state_dicts.load_state_checked``, which lists the keys when nothing matches or keys
are missing. ``download_file`` fetches weights into ``cache_dir()`` with a SHA-256 check and never leaves a partial
file behind.
"""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path
from typing import Mapping

import torch

from ..errors import CheckpointError

_WRAPPER_KEYS = ("model", "state_dict", "model_state_dict")
_PREFIXES = ("module.", "_orig_mod.")
_log = logging.getLogger(__name__)


def cache_dir() -> Path:
    """Folder for downloaded weights: ``$SAMADAPT_HOME`` or the user's cache dir (``~/.cache/samadapt``)."""
    env = os.environ.get("SAMADAPT_HOME")
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "samadapt"


def unwrap_state_dict(obj: object) -> dict[str, torch.Tensor]:
    """Return the plain name -> tensor mapping inside a checkpoint object, prefixes stripped."""
    while isinstance(obj, Mapping):
        inner = next((obj[k] for k in _WRAPPER_KEYS if k in obj and isinstance(obj[k], Mapping)), None)
        if inner is None:
            break
        obj = inner
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"checkpoint holds a {type(obj).__name__}, not a state dict")
    state = {}
    for key, value in obj.items():
        for prefix in _PREFIXES:
            while key.startswith(prefix):
                key = key[len(prefix):]
        state[key] = value
    return state


def read_torch_checkpoint(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a ``.pth``/``.pt`` file safely (tensors only) and unwrap it; errors name the file."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint file not found")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated zip, pickle with code, not a torch file
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint ({exc.__class__.__name__}: {exc})") from exc
    return unwrap_state_dict(obj)


def download_file(
    url: str,
    dest: str | Path,
    sha256: str | None = None,
    size: int | None = None,
    progress: bool = True,
    timeout: float = 60.0,
) -> Path:
    """Download ``url`` to ``dest``, verified, leaving nothing behind on failure.

    The data are streamed to a temporary file beside ``dest`` (same filesystem, so the final rename is atomic) while
    a SHA-256 is computed; a rich progress bar shows bytes, speed and ETA. ``size`` (bytes) and ``sha256`` are checked
    when given; with ``sha256=None`` the check is skipped with a logged warning. Only a verified file is renamed to
    ``dest``; any failure (network, HTTP, interrupted transfer, size or hash mismatch) removes the temporary file and
    raises ``CheckpointError`` naming the URL. ``file://`` URLs work (used by the tests).
    """
    import tempfile
    import urllib.error
    import urllib.request

    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".part", dir=dest.parent)
    tmp = Path(tmp_name)
    digest = hashlib.sha256()
    received = 0
    try:
        with os.fdopen(fd, "wb") as out:
            try:
                response = urllib.request.urlopen(url, timeout=timeout)
            except (urllib.error.URLError, OSError, ValueError) as exc:
                raise CheckpointError(f"{url}: download failed ({exc.__class__.__name__}: {exc})") from exc
            with response:
                length = response.headers.get("Content-Length") if response.headers else None
                total = int(length) if length and length.isdigit() else size
                with _progress_bar(progress) as bar:
                    task = bar.add_task(f"downloading {dest.name}", total=total)
                    while True:
                        try:
                            block = response.read(1 << 20)
                        except OSError as exc:
                            raise CheckpointError(
                                f"{url}: download interrupted after {received} bytes ({exc})") from exc
                        if not block:
                            break
                        out.write(block)
                        digest.update(block)
                        received += len(block)
                        bar.update(task, advance=len(block))
        if size is not None and received != size:
            raise CheckpointError(f"{url}: downloaded {received} bytes, expected {size}; file discarded")
        actual = digest.hexdigest()
        if sha256 is None:
            _log.warning("%s: no known SHA-256 to verify against; downloaded file has sha256=%s", url, actual)
        elif actual.lower() != sha256.lower():
            raise CheckpointError(f"{url}: SHA-256 mismatch (got {actual}, expected {sha256}); file discarded")
        os.replace(tmp, dest)
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        if isinstance(exc, (CheckpointError, KeyboardInterrupt, SystemExit)):
            raise
        raise CheckpointError(f"{url}: download failed ({exc.__class__.__name__}: {exc})") from exc
    return dest


def _progress_bar(enabled: bool):
    from rich.progress import (BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn,
                               TransferSpeedColumn)

    return Progress(
        TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
        TimeRemainingColumn(), disable=not enabled, transient=False,
    )
