"""The ProMISe prompting protocol (evaluate_prompting): rows per run and case, simulated user clicks on the bad
slices, its files, and the Dice it reports for a predictor whose masks are known."""

from __future__ import annotations

import json

import pytest
import torch

from samadapt.data.readers import open_dataset
from samadapt.errors import ConfigError
from samadapt.evaluation.protocols.prompting import evaluate_prompting
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
