"""3D voxel clicks (samadapt.data.clicks.voxel_click / batch_voxel_clicks): each policy on D x H x W error regions."""

from __future__ import annotations

import pytest
import torch

from samadapt.data.clicks import POLICIES, batch_voxel_clicks, voxel_click
from samadapt.errors import InputError


def cube(lo=4, hi=13, shape=(16, 18, 20)) -> torch.Tensor:
    m = torch.zeros(shape, dtype=torch.bool)
    m[lo:hi, lo:hi, lo:hi] = True
    return m


@pytest.mark.parametrize("policy", POLICIES)
def test_missed_lesion_gets_a_positive_click_inside_it(policy):
    target = cube()
    for seed in range(5):
        (i, j, k), label = voxel_click(torch.zeros_like(target), target, policy, torch.Generator().manual_seed(seed))
        assert label == 1 and bool(target[i, j, k])


def test_center_is_the_deepest_voxel_and_false_positives_get_negative_clicks():
    target = cube(4, 13)  # 9^3 cube centred at (8, 8, 8)
    assert voxel_click(torch.zeros_like(target), target, "center") == ((8, 8, 8), 1)
    pred = target.clone()
    pred[0:16, 0:18, 15:20] = True  # a deep false-positive slab beside the cube, which is found
    (i, j, k), label = voxel_click(pred, target, "center")
    assert label == 0 and bool(pred[i, j, k]) and not bool(target[i, j, k])
    assert voxel_click(target, target, "random") is None


def test_largest_region_picks_the_bigger_error_component():
    target = cube(2, 5) | cube(8, 15)  # small (27 voxels) and large (343) missed lesions
    (i, j, k), label = voxel_click(torch.zeros_like(target), target, "largest_region")
    assert label == 1 and (i, j, k) == (11, 11, 11)


def test_batch_voxel_clicks_pad_perfect_volumes_and_check_shapes():
    target = torch.stack([cube(), cube()])
    pred = torch.stack([torch.zeros_like(target[0]), target[1]])
    coords, labels = batch_voxel_clicks(pred, target, "center")
    assert coords.shape == (2, 1, 3) and coords[0, 0].tolist() == [8.0, 8.0, 8.0]
    assert labels.tolist() == [[1], [-1]]
    with pytest.raises(InputError, match="B x D x H x W"):
        batch_voxel_clicks(pred[0], target[0], "center")
    with pytest.raises(InputError, match="D x H x W"):
        voxel_click(pred[0, 0], target[0, 0], "center")
