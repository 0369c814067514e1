"""The ProMISe prompting protocol (evaluate_prompting): rows per run and case, simulated user clicks on the bad
slices, its files, and the Dice it reports for a predictor whose masks are known."""

from __future__ import annotations

import json

import pytest
import torch

from samadapt.data.readers import open_dataset
from samadapt.errors import ConfigError
from samadapt.evaluation.protocols.prompting import evaluate_prompting, point_facts
from samadapt.methods.promise import ProMISe


@pytest.fixture(scope="module")
def promise_run(train_tiny):
    return train_tiny("promise")


def test_prompting_rows_and_files_of_a_trained_run(promise_run, disc_pictures, tmp_path):
    out = tmp_path / "prompting"
    seen = []
    rows = evaluate_prompting(disc_pictures, {"apm": promise_run}, out, bad=1.01, clicks=2, batch_size=2,
                              progress=seen.append)
    cases = list(open_dataset(disc_pictures).make_split().test)
    assert [(r["case"], r["points"]) for r in rows] == [
        (c, p) for c in cases for p in ("apm", "gt (eval_points=gt)", "apm + 2 user clicks on bad slices")]
    assert all(0.0 <= r["dice3d"] <= 1.0 for r in rows)
    for r in rows[0::3]:
        assert set(r["point_facts"]) == {"spread_px", "border", "positive_on_fg", "negative_on_fg"}
    for r in rows[2::3]:  # a picture is one slice with a disc; Dice below 1.01 makes it bad
        assert r["fg_slices"] == r["bad_slices"] == 1
        assert len(r["bad_dice_by_clicks"]) == 3  # after 0, 1 and 2 clicks
    assert [json.loads(line) for line in seen] == rows
    assert json.loads((out / "promise_prompting.json").read_text()) == rows
    assert (out / "promise_prompting.md").read_text().count("\n| apm | ") == len(rows)
    for tag in ("auto", "clicks"):
        assert (out / f"points_apm_{tag}.png").read_bytes()[:4] == b"\x89PNG"


def _empty_until_clicked(self, batch):
    """Empty masks, except a picture with a positive user click on its label: the label itself."""
    label = batch["label"] > 0
    fg = torch.zeros_like(label)
    if "points" in batch:
        for r in range(len(label)):
            for (x, y), lab in zip(batch["points"][r].long().tolist(), batch["point_labels"][r].tolist()):
                if lab == 1 and bool(label[r, y, x]):
                    fg[r] = label[r]
    self.last_points = batch.get("points", torch.zeros(len(label), 1, 2))
    self.last_point_labels = batch.get("point_labels", torch.ones(len(label), 1, dtype=torch.long))
    self.last_point_source = "apm"
    p = fg[:, None].float()
    return torch.cat([1 - p, p], dim=1)


def test_one_positive_click_inside_the_missed_disc_makes_the_slice_perfect(promise_run, disc_pictures, tmp_path,
                                                                           monkeypatch):
    monkeypatch.setattr(ProMISe, "predict", _empty_until_clicked)
    rows = evaluate_prompting(disc_pictures, {"apm": promise_run}, tmp_path / "p", bad=0.8, clicks=3, batch_size=2)
    for auto, gt, clicked in zip(rows[0::3], rows[1::3], rows[2::3]):
        assert auto["dice3d"] == gt["dice3d"] == 0.0  # nothing predicted without a user click
        assert clicked["bad_slices"] == 1 and clicked["fg_slice_dice_auto"] == 0.0
        assert clicked["bad_dice_by_clicks"] == [0.0, 1.0, 1.0, 1.0]  # the first click lands inside the disc
        assert clicked["dice3d"] == 1.0


def test_no_runs_is_refused(disc_pictures, tmp_path):
    with pytest.raises(ConfigError, match="at least one"):
        evaluate_prompting(disc_pictures, {}, tmp_path / "none")
    assert not (tmp_path / "none").exists()


@pytest.fixture(scope="module")
def two_class_pictures(tmp_path_factory):
    """Six 64 x 64 pictures, each with a class-1 disc on the left and a class-2 disc on the right (labels.json)."""
    import numpy as np
    from PIL import Image

    root = tmp_path_factory.mktemp("two_class_discs")
    (root / "images").mkdir()
    (root / "masks").mkdir()
    (root / "labels.json").write_text(json.dumps({"labels": {"background": 0, "left": 1, "right": 2}}))
    rng = np.random.default_rng(5)
    yy, xx = np.mgrid[:64, :64]
    for i in range(6):
        mask = np.zeros((64, 64), np.uint8)
        for k, cx in ((1, 18), (2, 46)):
            mask[(yy - rng.integers(20, 44)) ** 2 + (xx - cx) ** 2 < rng.integers(6, 10) ** 2] = k
        img = (40 + 70 * mask + rng.normal(0, 8, mask.shape)).clip(0, 255).astype(np.uint8)
        Image.fromarray(img).save(root / "images" / f"t{i:02d}.png")
        Image.fromarray(mask).save(root / "masks" / f"t{i:02d}.png")
    return root


def test_a_two_class_run_is_studied_head_by_head_against_its_own_class(two_class_pictures, tmp_path, monkeypatch):
    from samadapt.config.run_config import load_config
    from samadapt.engine.run import train

    run = tmp_path / "run"
    train(load_config(None, ["backbone.name=tiny", "method.name=promise", f"data.path={two_class_pictures}",
                             "data.cache=off", "data.empty_ratio=null", "train.epochs=1", "train.batch_size=4",
                             "train.device=cpu", f"output={run}"]))
    monkeypatch.setattr(ProMISe, "predict", _empty_until_clicked)  # each head: its own class once clicked
    out = tmp_path / "p"
    rows = evaluate_prompting(two_class_pictures, {"apm": run}, out, bad=0.8, clicks=2, batch_size=2)
    cases = list(open_dataset(two_class_pictures).make_split().test)
    assert [(r["case"], r["class"], r["points"]) for r in rows] == [
        (c, k, p) for c in cases for k in (1, 2) for p in ("apm", "gt (eval_points=gt)",
                                                           "apm + 2 user clicks on bad slices")]
    for clicked in rows[2::3]:  # the click lands inside the disc of the head's own class only
        assert clicked["bad_dice_by_clicks"] == [0.0, 1.0, 1.0] and clicked["dice3d"] == 1.0
    assert (out / "promise_prompting.md").read_text().count("\n| apm | 2 | ") == len(rows) // 2
    assert (out / "points_apm_class2_clicks.png").read_bytes()[:4] == b"\x89PNG"


def test_point_facts_tell_a_fixed_border_pattern_from_points_that_follow_the_foreground():
    truth = torch.zeros(2, 10, 10, dtype=torch.long)
    truth[0, 2:4, 2:4] = 1
    truth[1, 6:8, 6:8] = 1
    labels = torch.tensor([[1, 0, -1], [1, 0, -1]])  # the third point is padding
    fixed = torch.tensor([[[0.0, 0.0], [9.9, 5.0], [5.0, 5.0]]] * 2)  # the same pattern on both slices, on edges
    assert point_facts(fixed, labels, truth, 10) == {"spread_px": 0.0, "border": 1.0, "positive_on_fg": 0.0,
                                                     "negative_on_fg": 0.0}
    following = torch.tensor([[[2.5, 2.5], [8.0, 1.0], [5.0, 5.0]], [[6.5, 6.5], [1.0, 8.0], [5.0, 5.0]]])
    facts = point_facts(following, labels, truth, 10)
    assert facts["border"] == 0.0 and facts["positive_on_fg"] == 1.0 and facts["negative_on_fg"] == 0.0
    assert facts["spread_px"] > 4.0  # each point moved by about 5.7 px between the two slices
    assert point_facts(fixed, torch.tensor([[1, 1, -1]] * 2), truth, 10)["negative_on_fg"] is None
