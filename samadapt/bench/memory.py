"""Peak resident memory of this process (Linux ``/proc``), resettable so that one step's peak can be read."""

from __future__ import annotations

from pathlib import Path


def reset_peak_rss() -> None:
    """Reset the process's high-water mark (``VmHWM``) to its current RSS; a no-op where /proc is unavailable."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def peak_rss_mib() -> float:
    """The process's peak RSS in MiB since start or the last ``reset_peak_rss``; NaN where /proc is unavailable."""
    try:
        status = Path("/proc/self/status").read_text()
    except OSError:
        return float("nan")
    for line in status.splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")
