"""Small synthetic slice datasets (bright discs on a dark background) for fast engine tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset


def write_disc_pictures(root: Path, count: int, shape: tuple[int, int], seed: int, name: str,
                        centre: tuple[int, int, int, int], radius: tuple[int, int]) -> Path:
    """A 2D ``images/`` + ``masks/`` folder of ``count`` gray pictures (H x W ``shape``), one bright disc each,
    masks stored as {0, 255}, file stems ``name.format(i)``; centres drawn from ``centre`` = (y_lo, y_hi, x_lo, x_hi), radii from ``radius``."""
    (root / "images").mkdir()
    (root / "masks").mkdir()
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:shape[0], :shape[1]]
    for i in range(count):
        cy, cx, r = rng.integers(*centre[:2]), rng.integers(*centre[2:]), rng.integers(*radius)
        mask = (yy - cy) ** 2 + (xx - cx) ** 2 < r * r
        img = (40 + 150 * mask + rng.normal(0, 8, mask.shape)).clip(0, 255).astype(np.uint8)
        Image.fromarray(img).save(root / "images" / f"{name.format(i)}.png")
        Image.fromarray((mask * 255).astype(np.uint8)).save(root / "masks" / f"{name.format(i)}.png")
    return root


class Discs(Dataset):
    """``n`` items following the batch convention: image 3 x S x S in [0,1], label S x S, key.

    With ``num_classes`` K > 1, disc k has intensity proportional to k so classes are separable.
    """

    def __init__(self, n: int = 16, size: int = 64, num_classes: int = 1, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
        self.items = []
        for i in range(n):
            label = torch.zeros(size, size, dtype=torch.long)
            for k in range(1, num_classes + 1):
                cx, cy = torch.randint(size // 4, 3 * size // 4, (2,), generator=g).tolist()
                r = int(torch.randint(size // 10, size // 5, (1,), generator=g))
                label[(xx - cx) ** 2 + (yy - cy) ** 2 < r * r] = k
            image = 0.15 + 0.7 * label.float() / num_classes + 0.03 * torch.randn(size, size, generator=g)
            self.items.append({"image": image.clamp(0, 1).expand(3, -1, -1).clone(), "label": label,
                               "key": f"disc-{seed}-{i}"})

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict:
        return self.items[i]
