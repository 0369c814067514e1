"""SliceDataset items (the batch convention), the foreground/empty sampler, collate, augmentation, reassembly."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from samadapt.data.augment import RECIPES, build_augment
from samadapt.data.cases import Case
from samadapt.data.preprocessing import IntensityConfig, PadInfo
from samadapt.data.slices import SliceDataset, collate, reassemble, volume_slices
from samadapt.errors import ConfigError, InputError


def make_case(cid="c", shape=(8, 20, 30), fg_slices=(2, 3, 4), modality="MR", channels=1, seed=0):
    rng = np.random.default_rng(seed)
    image = rng.normal(100, 20, (channels,) + shape).astype(np.float32)
    label = np.zeros(shape, np.uint8)
    for z in fg_slices:
        label[z, 5:12, 8:20] = 1
    return Case(id=cid, image=image, label=label, spacing=(3.0, 1.0, 1.0), modality=modality, source=f"/x/{cid}")


def test_items_follow_the_batch_convention():
    ds = SliceDataset([make_case()], input_size=32)
    assert len(ds) == 8
    item = ds[3]
    assert item["image"].shape == (3, 32, 32) and item["image"].dtype == torch.float32
    assert 0.0 <= item["image"].min() and item["image"].max() <= 1.0
    assert item["label"].shape == (32, 32) and item["label"].dtype == torch.int64 and item["label"].sum() > 0
    assert item["case"] == "c" and item["slice"] == 3 and isinstance(item["key"], str)
    assert item["pad"] == PadInfo(20, 30, 21, 32, 32)
    assert item["image"][:, 21:].abs().sum() == 0  # bottom padding is zero


def test_keys_follow_content():
    case = make_case()
    a = SliceDataset([case], 32)
    assert a[1]["key"] == SliceDataset([case], 32)[1]["key"]  # deterministic
    assert len({a[i]["key"] for i in range(len(a))}) == len(a)
    assert SliceDataset([case], 32, intensity=IntensityConfig(percentiles=(1.0, 99.0)))[1]["key"] != a[1]["key"]
    assert SliceDataset([case], 48)[1]["key"] != a[1]["key"]


def test_other_axes_slice_the_right_planes():
    case = make_case(shape=(6, 10, 14))
    ds = SliceDataset([case], 16, axis=2)
    assert len(ds) == 14 and ds[0]["pad"] == PadInfo(6, 10, 10, 16, 16)
    assert ds.slice_shape(0) == (6, 10)


def test_empty_ratio_sampler_is_seeded_and_redrawn():
    cases = [make_case("a", shape=(20, 16, 16), fg_slices=(1, 2)), make_case("b", shape=(20, 16, 16), fg_slices=(5,))]
    ds = SliceDataset(cases, 16, empty_ratio=2.0, seed=0)
    keys = ds.slice_keys
    fg = [k for k in keys if k in {("a", 1), ("a", 2), ("b", 5)}]
    assert len(fg) == 3 and len(keys) == 3 + 6
    assert SliceDataset(cases, 16, empty_ratio=2.0, seed=0).slice_keys == keys
    ds.set_epoch(1)
    assert ds.slice_keys != keys and len(ds) == 9
    assert len(SliceDataset(cases, 16, empty_ratio=0.0)) == 3
    assert len(SliceDataset(cases, 16)) == 40


def test_sampler_without_foreground_raises():
    case = make_case(fg_slices=())
    with pytest.raises(InputError, match="/x/c.*no slice"):
        SliceDataset([case], 16, empty_ratio=1.0)
    assert len(SliceDataset([case], 16)) == 8  # fine without the sampler


def test_restrict_for_fewshot():
    ds = SliceDataset([make_case()], 16)
    ds.restrict([("c", 2), ("c", 4)])
    assert ds.slice_keys == [("c", 2), ("c", 4)]
    with pytest.raises(ConfigError):
        ds.restrict([("zzz", 1)])


def test_collate_with_dataloader():
    ds = SliceDataset([make_case("a"), make_case("b", seed=1)], 32)
    batch = next(iter(DataLoader(ds, batch_size=5, shuffle=False, collate_fn=collate)))
    assert batch["image"].shape == (5, 3, 32, 32) and batch["label"].shape == (5, 32, 32)
    assert batch["case"] == ["a"] * 5 and batch["slice"].tolist() == [0, 1, 2, 3, 4]
    assert len(batch["key"]) == 5 and batch["pad"][0] == PadInfo(20, 30, 21, 32, 32)
    default = next(iter(DataLoader(ds, batch_size=2)))  # torch's default_collate works too
    assert default["image"].shape == (2, 3, 32, 32) and torch.is_tensor(default["pad"].orig_h)


def test_volume_slices_and_reassemble_roundtrip():
    case = make_case(shape=(5, 20, 30), fg_slices=(1, 2))
    for axis in (0, 1, 2):
        slices = volume_slices(case, axis=axis, input_size=32)
        probs = []
        for i in range(len(slices)):
            lab = slices[i]["label"]
            probs.append(torch.nn.functional.one_hot(lab, 2).permute(2, 0, 1).float())  # perfect prediction
        vol = reassemble(probs, axis, case)
        assert vol.shape == case.shape
        np.testing.assert_array_equal(vol, case.label)  # upsampled slices restore exactly
    probs = reassemble([torch.rand(3, 20, 30) for _ in range(5)], 0, case, return_probs=True)
    assert probs.shape == (3, 5, 20, 30)
    with pytest.raises(ValueError):
        reassemble([torch.rand(2, 32, 32)] * 4, 0, case)


@pytest.mark.parametrize("recipe", [r for r in RECIPES if r != "none"])
def test_augmentation_recipes_keep_shapes_and_pair_image_with_label(recipe):
    case = make_case(shape=(4, 32, 32), fg_slices=(0, 1, 2, 3))
    ds = SliceDataset([case], 32, augment=recipe, seed=0)
    plain = SliceDataset([case], 32)
    changed = 0
    for i in range(4):
        item = ds[i]
        assert item["image"].shape == (3, 32, 32) and item["label"].dtype == torch.int64
        assert 0 <= item["image"].min() and item["image"].max() <= 1
        assert set(item["label"].unique().tolist()) <= {0, 1}
        changed += int(not torch.equal(item["image"], plain[i]["image"]))
        assert item["key"] != plain[i]["key"] or torch.equal(item["image"], plain[i]["image"])
    assert changed >= 1
    assert torch.equal(ds[0]["image"], SliceDataset([case], 32, augment=recipe, seed=0)[0]["image"])  # seeded


def test_flip_moves_label_with_image():
    aug = build_augment("light", 16)
    image = torch.zeros(3, 16, 16)
    image[:, :4, :4] = 1.0
    label = torch.zeros(16, 16, dtype=torch.long)
    label[:4, :4] = 1
    for seed in range(6):
        out = aug({"image": image, "label": label}, seed=seed)
        bright = out["image"][0] > out["image"][0].mean()
        assert torch.equal(bright, out["label"].bool())
    assert build_augment("none", 16) is None
    with pytest.raises(ConfigError):
        build_augment("heavy", 16)


def test_2d_pictures_slice_along_axis_0_only():
    pic = Case("p", np.full((3, 1, 10, 12), 128, np.float32), np.zeros((1, 10, 12), np.uint8), modality="natural",
               is_2d=True)
    item = SliceDataset([pic], 16)[0]
    assert len(SliceDataset([pic], 16)) == 1 and torch.allclose(item["image"][:, :10, :12], torch.tensor(128 / 255), atol=3e-4)
    with pytest.raises(ConfigError, match="axis 0"):
        SliceDataset([pic], 16, axis=1)
