"""Simulated clicks (samadapt.data.clicks): each named policy, one image (numpy or torch) and a batch."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from samadapt.data.clicks import POLICIES, Click, batch_clicks, next_click
from samadapt.errors import ConfigError, InputError


# --- batch_clicks: M-SAM's policies (moved from test_method_msam with msam.simulate_clicks) --------------------------
def square(h=32, w=32, r0=8, r1=20, c0=10, c1=26):
    m = torch.zeros(h, w, dtype=torch.bool)
    m[r0:r1, c0:c1] = True
    return m


@pytest.mark.parametrize("mode", ["random", "center"])
def test_clicks_empty_prediction_gives_positive_click_inside_target(mode):
    target = square()[None]
    pred = torch.zeros_like(target)
    for seed in range(20):
        coords, labels = batch_clicks(pred, target, mode, torch.Generator().manual_seed(seed))
        x, y = coords[0, 0].long().tolist()
        assert labels.tolist() == [[1]]
        assert bool(target[0, y, x])


def test_center_click_is_the_deepest_error_pixel():
    target = torch.zeros(1, 31, 31, dtype=torch.bool)
    target[0, 5:26, 5:26] = True  # 21 x 21 square centred at (15, 15)
    coords, labels = batch_clicks(torch.zeros_like(target), target, "center")
    assert coords[0, 0].tolist() == [15.0, 15.0] and labels.item() == 1
    # A false-positive band deeper than a thin false-negative strip: negative click in the band's middle.
    pred_fp = target.clone()
    pred_fp[0, 5:26, 5:7] = False  # FN strip 2 columns wide (depth 1)
    pred_fp[0, 26:31, 5:26] = True  # FP band 5 rows deep below the square (depth 3)
    coords, labels = batch_clicks(pred_fp, target, "center")
    x, y = coords[0, 0].long().tolist()
    assert labels.item() == 0 and y == 28 and 5 <= x <= 25
    assert bool(pred_fp[0, y, x]) and not bool(target[0, y, x])


def test_random_clicks_stay_in_the_error_region_with_the_right_labels():
    target = square()[None]
    pred = square(r0=12, r1=26, c0=10, c1=26)[None]  # shifted down: FN above, FP below
    fn, fp = target & ~pred, pred & ~target
    seen = set()
    g = torch.Generator().manual_seed(0)
    for _ in range(200):
        coords, labels = batch_clicks(pred, target, "random", g)
        x, y = coords[0, 0].long().tolist()
        lab = labels.item()
        assert (lab == 1 and bool(fn[0, y, x])) or (lab == 0 and bool(fp[0, y, x]))
        seen.add(lab)
    assert seen == {0, 1}


def test_perfect_mask_gives_padding_click_per_image():
    target = torch.stack([square(), square(r0=0, r1=4)])
    pred = target.clone()
    pred[1, 30, 30] = True  # image 1 has one FP pixel
    coords, labels = batch_clicks(pred, target, "random")
    assert labels[:, 0].tolist() == [-1, 0]
    assert coords[1, 0].tolist() == [30.0, 30.0]
    both_empty = torch.zeros(1, 8, 8, dtype=torch.bool)
    assert batch_clicks(both_empty, both_empty, "center")[1].item() == -1
    with pytest.raises(InputError):
        batch_clicks(pred[:, :4], target, "random")
    with pytest.raises(ConfigError):
        batch_clicks(pred, target, "nearest")


# --- next_click: one image ------------------------------------------------------------------------------------------
def thick_and_thin():
    """A 7 x 7 missed square (49 pixels, depth 4) and a false strip 2 x 40 (80 pixels, depth 1) in a 40 x 48 image."""
    target = np.zeros((40, 48), dtype=bool)
    target[4:11, 20:27] = True  # centre (row 7, col 23)
    pred = np.zeros_like(target)
    pred[30:32, 4:44] = True
    return pred, target


def test_largest_region_clicks_the_deepest_point_of_the_largest_error_component():
    pred, target = thick_and_thin()
    # the strip is the larger component: a negative click at its first deepest pixel (row 30 or 31, inside the strip)
    click = next_click(pred, target, "largest_region")
    assert click.label == 0 and pred[int(click.y), int(click.x)] and not target[int(click.y), int(click.x)]
    assert click == Click(4.0, 30.0, 0)
    # 'center' takes the deeper region instead: the missed square's centre, positive
    assert next_click(pred, target, "center") == Click(23.0, 7.0, 1)


def test_largest_region_false_negative_gives_a_positive_click_at_its_centre():
    target = np.zeros((32, 32), dtype=bool)
    target[5:26, 5:26] = True  # 21 x 21, centre (15, 15)
    target[28:30, 28:30] = True  # a small second missed blob
    pred = np.zeros_like(target)
    pred[0, 0:3] = True  # a 3-pixel false region: smaller than the big square
    assert next_click(pred, target, "largest_region") == Click(15.0, 15.0, 1)
    # the same masks as torch tensors give the same click
    assert next_click(torch.from_numpy(pred), torch.from_numpy(target), "largest_region") == Click(15.0, 15.0, 1)


def test_equal_sized_fn_and_fp_components_go_to_the_false_negative():
    target = np.zeros((20, 20), dtype=bool)
    target[2:7, 2:7] = True
    pred = np.zeros_like(target)
    pred[12:17, 12:17] = True
    assert next_click(pred, target, "largest_region") == Click(4.0, 4.0, 1)


@pytest.mark.parametrize("policy", POLICIES)
def test_perfect_prediction_gives_no_click(policy):
    target = np.zeros((16, 16), dtype=bool)
    target[3:9, 4:12] = True
    assert next_click(target.copy(), target, policy) is None
    assert next_click(np.zeros_like(target), np.zeros_like(target), policy) is None


@pytest.mark.parametrize("policy", POLICIES)
def test_batch_clicks_agree_with_next_click(policy):
    pred, target = thick_and_thin()
    coords, labels = batch_clicks(torch.from_numpy(pred)[None], torch.from_numpy(target)[None], policy,
                                  torch.Generator().manual_seed(3))
    click = next_click(pred, target, policy, torch.Generator().manual_seed(3))
    assert coords[0, 0].tolist() == [click.x, click.y] and labels.item() == click.label


def test_bad_policy_and_shapes_are_refused():
    pred, target = thick_and_thin()
    with pytest.raises(ConfigError, match="largest_region"):
        next_click(pred, target, "error_centre")
    with pytest.raises(InputError, match="H x W"):
        next_click(pred[:, :4], target, "center")
