"""Embedding cache on the tiny backbone: hit, miss, invalidation, corrupt/partial entries, precompute."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from samadapt.backbones import build_backbone
from samadapt.engine.embedding_cache import EmbeddingCache
from samadapt.data.cases import Case
from samadapt.data.slices import SliceDataset


@pytest.fixture(scope="module")
def tiny():
    return build_backbone("tiny", seed=0).eval()


@pytest.fixture(scope="module")
def dataset():
    rng = np.random.default_rng(0)
    label = np.zeros((5, 40, 50), np.uint8)
    label[1:3, 10:20, 10:30] = 1
    case = Case("c", rng.normal(size=(1, 5, 40, 50)).astype(np.float32), label, modality="MR")
    return SliceDataset([case], 64)


def batch_of(dataset, idx):
    items = [dataset[i] for i in idx]
    return [it["key"] for it in items], torch.stack([it["image"] for it in items])


def test_miss_then_hit_returns_identical_features(tmp_path, tiny, dataset):
    cache = EmbeddingCache(tmp_path, tiny, intermediates=True)
    keys, images = batch_of(dataset, [0, 1, 2])
    first = cache.get_or_compute(keys, images)
    assert cache.stats() == {"hits": 0, "misses": 3, "recomputed": 0}
    assert first.embedding.shape == (3, 256, 16, 16) and first.embedding.dtype == torch.float32
    assert [t.shape for t in first.intermediates] == [(3, 64, 16, 16)] * 3
    with torch.no_grad():
        direct = tiny.encode(tiny.preprocess(images), intermediates=True)
    torch.testing.assert_close(first.embedding, direct.embedding.half().float())  # fp16 round trip only
    again = cache.get_or_compute(keys, images)
    assert cache.hits == 3 and cache.misses == 3
    assert torch.equal(again.embedding, first.embedding)
    assert all(torch.equal(a, b) for a, b in zip(again.intermediates, first.intermediates))
    # mixed batch: order is kept, only the new slice is computed
    keys2, images2 = batch_of(dataset, [3, 1])
    mixed = cache.get_or_compute(keys2, images2)
    assert cache.misses == 4 and torch.equal(mixed.embedding[1], first.embedding[1])
    assert len(cache.entries()) == 4 and cache.size_on_disk() > 0
    assert (cache.dir / "namespace.json").is_file()
    assert not list(cache.dir.glob("*/.*"))  # no temporary files left


def test_other_weights_or_intermediates_do_not_reuse_entries(tmp_path, tiny, dataset):
    keys, images = batch_of(dataset, [0])
    EmbeddingCache(tmp_path, tiny, intermediates=False).get_or_compute(keys, images)
    other = build_backbone("tiny", seed=1)
    assert other.weights_id != tiny.weights_id
    cache_other = EmbeddingCache(tmp_path, other, intermediates=False)
    cache_other.get_or_compute(keys, images)
    assert cache_other.misses == 1 and cache_other.dir != EmbeddingCache(tmp_path, tiny, False).dir
    with_inter = EmbeddingCache(tmp_path, tiny, intermediates=True)
    with_inter.get_or_compute(keys, images)
    assert with_inter.misses == 1
    no_inter = EmbeddingCache(tmp_path, tiny, intermediates=False)
    out = no_inter.get_or_compute(keys, images)
    assert no_inter.hits == 1 and out.intermediates == []


def test_changed_preprocessing_changes_the_key(tmp_path, tiny, dataset):
    from samadapt.data.preprocessing import IntensityConfig

    cache = EmbeddingCache(tmp_path, tiny)
    keys, images = batch_of(dataset, [2])
    cache.get_or_compute(keys, images)
    other = SliceDataset(dataset.cases, 64, intensity=IntensityConfig(mode="percentile", percentiles=(5.0, 95.0)))
    keys2, images2 = batch_of(other, [2])
    assert keys2 != keys
    cache.get_or_compute(keys2, images2)
    assert cache.misses == 2


@pytest.mark.parametrize("damage", ["truncate", "flip", "empty", "wrong_key"])
def test_corrupt_entries_are_detected_and_recomputed(tmp_path, tiny, dataset, damage):
    cache = EmbeddingCache(tmp_path, tiny)
    keys, images = batch_of(dataset, [0, 1])
    good = cache.get_or_compute(keys, images)
    path = cache.path(keys[0])
    data = path.read_bytes()
    if damage == "truncate":
        path.write_bytes(data[: len(data) // 2])
    elif damage == "flip":
        flipped = bytearray(data)
        flipped[-10] ^= 0xFF  # inside the tensor bytes: only the checksum can tell
        path.write_bytes(bytes(flipped))
    elif damage == "empty":
        path.write_bytes(b"")
    else:
        path.write_bytes(cache.path(keys[1]).read_bytes())  # a valid file under the wrong name
    fresh = EmbeddingCache(tmp_path, tiny)
    out = fresh.get_or_compute(keys, images)
    assert fresh.stats() == {"hits": 1, "misses": 1, "recomputed": 1}
    assert torch.equal(out.embedding, good.embedding)
    assert fresh.load(keys[0]) is not None  # rewritten correctly


def test_failed_write_leaves_no_partial_entry(tmp_path, tiny, dataset, monkeypatch):
    import safetensors.torch

    cache = EmbeddingCache(tmp_path, tiny)
    keys, images = batch_of(dataset, [0])

    def broken(tensors, filename, metadata=None):
        with open(filename, "wb") as handle:
            handle.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", broken)
    with pytest.raises(OSError):
        cache.get_or_compute(keys, images)
    assert not cache.path(keys[0]).exists() and not list(cache.dir.rglob("*.part"))


def test_precompute_counts_entries_and_bytes(tmp_path, tiny, dataset):
    cache = EmbeddingCache(tmp_path, tiny)
    n, size = cache.precompute(dataset, batch_size=2, progress=False)
    assert n == len(dataset) == cache.misses and size == cache.size_on_disk()
    per_slice = size / n
    assert 256 * 16 * 16 * 2 <= per_slice < 256 * 16 * 16 * 2 + 4096  # fp16 embedding + small header
    n2, size2 = cache.precompute(dataset, batch_size=2, progress=False)
    assert (n2, size2) == (n, size) and cache.misses == len(dataset)  # nothing recomputed
