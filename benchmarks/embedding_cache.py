"""Epoch time of a frozen-encoder method with and without the embedding cache (issue 3's speed target).

Trains the ``decoder`` baseline on LiteMedSAM for one epoch over ``--slices`` MNI152 training slices three ways:
encoder every step (no cache), first cached epoch (cold: encodes and writes), and a warm cached epoch. Prints the
times, the warm/no-cache ratio and the cache size per slice. Both sides run in this process, on the same slices,
with the same thread count.

    python benchmarks/embedding_cache.py --slices 24 --threads 2
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from samadapt.backbones import build_backbone
from samadapt.data.cache import EmbeddingCache
from samadapt.data.demo_data import build_mni152
from samadapt.data.readers import open_dataset
from samadapt.data.slices import SliceDataset, collate
from samadapt.engine.config import TrainConfig
from samadapt.engine.trainer import Trainer
from samadapt.methods import build_method


def one_epoch(method, ds, out: Path, feature_source=None) -> float:
    cfg = TrainConfig(epochs=1, batch_size=8, lr=1e-4)
    trainer = Trainer(method, cfg, out, {}, torch.device("cpu"), collate=collate, feature_source=feature_source)
    t = time.perf_counter()
    trainer.fit(ds, None)
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--slices", type=int, default=24)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    work = Path(tempfile.mkdtemp(prefix="samadapt-bench-"))
    source = open_dataset(build_mni152(work / "data"))
    backbone = build_backbone("litemedsam").eval()
    ds = SliceDataset([source.load("mni152_train")], backbone.input_size, axis=0)
    ds.restrict(ds.slice_keys[:: max(len(ds) // args.slices, 1)][: args.slices])
    cache = EmbeddingCache(work / "cache", backbone)

    def fetch(batch):
        return cache.get_or_compute(batch["key"], batch["image"])

    torch.manual_seed(0)
    t_plain = one_epoch(build_method("decoder", backbone), ds, work / "plain")
    t_cold = one_epoch(build_method("decoder", backbone), ds, work / "cold", fetch)
    t_warm = one_epoch(build_method("decoder", backbone), ds, work / "warm", fetch)
    per_slice = cache.size_on_disk() / max(len(cache.entries()), 1)
    print(f"slices: {len(ds)}  threads: {args.threads}")
    print(f"epoch without cache:        {t_plain:8.2f} s")
    print(f"epoch with cache (cold):    {t_cold:8.2f} s")
    print(f"epoch with cache (warm):    {t_warm:8.2f} s")
    print(f"speed-up warm vs no cache:  {t_plain / t_warm:8.1f} x")
    print(f"cache size per slice:       {per_slice / 2**20:8.2f} MiB (fp16 embedding 256x64x64)")


if __name__ == "__main__":
    main()
