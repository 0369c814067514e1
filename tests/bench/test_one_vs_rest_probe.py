"""benchmarks/one_vs_rest_probe.py: each class's own mask against the combined label map."""

import importlib.util
from pathlib import Path

import torch

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "one_vs_rest_probe.py"


def load_probe():
    spec = importlib.util.spec_from_file_location("one_vs_rest_probe", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class SameMaskHeads:
    """Two heads that both predict the whole 4 x 4 square, head 1 more confident (like nested oracle boxes)."""

    def __init__(self):
        square = torch.zeros(8, 8)
        square[2:6, 2:6] = 1.0
        self.heads = [self._head(0.9 * square), self._head(0.8 * square)]

    @staticmethod
    def _head(p: torch.Tensor):
        class Head:
            def predict(self, batch):
                fg = p.expand(batch["image"].shape[0], 1, *p.shape)
                return torch.cat([1 - fg, fg], dim=1)
        return Head()

    def features(self, batch):
        return None

    def _binary_batch(self, batch, k):
        return batch

    def predict(self, batch):
        fg = torch.cat([head.predict(batch)[:, 1:2] for head in self.heads], dim=1)
        return torch.cat([torch.prod(1 - fg, dim=1, keepdim=True), fg], dim=1)


def test_own_masks_score_each_class_and_the_label_map_gives_overlaps_to_one():
    label = torch.zeros(8, 8, dtype=torch.long)
    label[2:6, 2:4] = 1  # left half of the square
    label[2:6, 4:6] = 2  # right half
    items = [{"image": torch.zeros(3, 8, 8), "label": label} for _ in range(3)]
    result = load_probe().score(SameMaskHeads(), items, [1, 2])
    assert result["own"] == [0.667, 0.667]  # 2 * 8 / (16 + 8) per slice, each class
    assert result["combined"] == [0.667, 0.0]  # the more confident head takes the whole square
