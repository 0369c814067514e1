"""Keep freed tensor memory in the process heap during training (glibc's malloc; ``train.reuse_memory``).

glibc serves every allocation above its mmap threshold (at most 32 MiB) with a fresh ``mmap`` and returns it to
the kernel with ``munmap`` on free. A cached decoder step on LiteMedSAM allocates activations of 100-200 MiB
(B x K decoder passes upscaled to 256 x 256), so each step maps, zero-fills page by page and unmaps gigabytes:
measured on a 2-core EPYC (decoder_cpu, mni152-tissue, batch 8, 1 thread) about half of the training process's
CPU time was kernel time with ~2 million minor page faults per step. ``keep_freed_memory`` sets
``M_MMAP_MAX=0`` (large blocks come from the heap and are reused by the next step) and raises
``M_TRIM_THRESHOLD`` (the heap top is not handed back after every step). The settings are process-wide and stay
for the life of the process; peak RSS stays that of the largest step. Other C libraries (musl, macOS, Windows):
nothing is changed.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import platform

M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
TRIM_THRESHOLD = 1 << 30
"""Free memory at the top of the heap (bytes) kept before glibc trims it."""


def _glibc():
    """The process's glibc as a ``ctypes.CDLL``, or None on another C library."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None


def keep_freed_memory() -> bool:
    """Apply the settings of the module docstring; True when glibc accepted them, False elsewhere."""
    libc = _glibc()
    if libc is None:
        return False
    return bool(libc.mallopt(M_MMAP_MAX, 0)) and bool(libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
