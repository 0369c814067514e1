import platform

import pytest
import torch

import samadapt.engine.allocator as allocator
import samadapt.engine.trainer as trainer_module
from samadapt.backbones import build_backbone
from samadapt.config.run_config import TrainConfig
from samadapt.engine.trainer import Trainer
from samadapt.methods import build_method
from synthetic import Discs


class FakeLibc:
    def __init__(self):
        self.calls = []

    def mallopt(self, param, value):
        self.calls.append((param, value))
        return 1


def test_keep_freed_memory_sets_mmap_max_and_trim_threshold(monkeypatch):
    libc = FakeLibc()
    monkeypatch.setattr(allocator, "_glibc", lambda: libc)
    assert allocator.keep_freed_memory()
    assert libc.calls == [(allocator.M_MMAP_MAX, 0), (allocator.M_TRIM_THRESHOLD, allocator.TRIM_THRESHOLD)]


def test_keep_freed_memory_leaves_other_c_libraries_alone(monkeypatch):
    monkeypatch.setattr(allocator, "_glibc", lambda: None)
    assert not allocator.keep_freed_memory()


MMAPPED_BLOCKS_AFTER_A_LARGE_TENSOR = """
import ctypes, sys
import torch
import samadapt.engine.allocator as allocator
libc = ctypes.CDLL("libc.so.6")
if not hasattr(libc, "mallinfo2"):
    print("skip")
    sys.exit()
class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                      "fsmblks", "uordblks", "fordblks", "keepcost")]
libc.mallinfo2.restype = MallInfo2
if sys.argv[1] == "on":
    assert allocator.keep_freed_memory()
before = libc.mallinfo2().hblks  # blocks served by mmap
big = torch.empty(64 << 20, dtype=torch.uint8)  # above glibc's largest mmap threshold (32 MiB)
print(libc.mallinfo2().hblks - before)
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's malloc only")
def test_large_tensors_come_from_the_heap_after_keep_freed_memory():
    """In a fresh process (malloc's state is process-wide, so not inside the test session): a 64 MiB tensor is one
    new mmapped block without the setting and none with it."""
    import subprocess
    import sys

    def new_blocks(mode: str) -> str:
        proc = subprocess.run([sys.executable, "-c", MMAPPED_BLOCKS_AFTER_A_LARGE_TENSOR, mode],
                              capture_output=True, encoding="utf-8", timeout=300)
        assert proc.returncode == 0, proc.stderr[-2000:]
        return proc.stdout.strip()

    off = new_blocks("off")
    if off == "skip":
        pytest.skip("glibc without mallinfo2")
    assert (off, new_blocks("on")) == ("1", "0")


@pytest.mark.parametrize("reuse", [True, False])
def test_trainer_applies_the_setting_unless_turned_off(tmp_path, monkeypatch, reuse):
    calls = []
    monkeypatch.setattr(trainer_module, "keep_freed_memory", lambda: calls.append(1) or True)
    torch.manual_seed(0)
    method = build_method("decoder", build_backbone("tiny"), {}, 1)
    cfg = TrainConfig(epochs=1, batch_size=4, reuse_memory=reuse)
    Trainer(method, cfg, tmp_path / "run", {}, torch.device("cpu")).fit(Discs(4), None)
    assert calls == ([1] if reuse else [])
