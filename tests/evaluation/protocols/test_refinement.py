"""The M-SAM refinement-curve protocol (evaluate_refinement): its files, one point per iteration and case, and the
Dice it reports for predictors whose masks are known."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from samadapt.data.readers import open_dataset
from samadapt.errors import ConfigError
from samadapt.evaluation.protocols.refinement import MODES, evaluate_refinement
from samadapt.methods.msam import MSAM


@pytest.fixture(scope="module")
def msam_checkpoint(train_tiny):
    return train_tiny("msam", train_iterations=2) / "checkpoints" / "best.safetensors"


def test_refinement_writes_one_point_per_iteration_and_case(msam_checkpoint, disc_pictures, tmp_path):
    out = tmp_path / "refinement"
    result = evaluate_refinement(msam_checkpoint, disc_pictures, out, iterations=3, baselines={"decoder": 0.5})
    cases = list(open_dataset(disc_pictures).make_split().test)
    assert result["cases"] == cases and len(cases) == 2
    assert set(result["mean"]) == set(MODES)
    for mode in MODES:
        per_case = [result["per_case"][c][mode] for c in cases]
        assert all(len(curve) == 3 for curve in per_case)
        assert all(0.0 <= v <= 1.0 for curve in per_case for v in curve)
        assert result["mean"][mode] == pytest.approx(list(np.mean(per_case, axis=0)))
    saved = json.loads((out / "refinement.json").read_text())
    assert saved["mean"] == result["mean"] and saved["baselines"] == {"decoder": 0.5}
    text = (out / "refinement.md").read_text()
    assert "| mode | it 1 | it 2 | it 3 |" in text and "decoder 0.5000" in text
    assert (out / "refinement_curve.png").read_bytes()[:4] == b"\x89PNG"


def _scripted(masks):
    """An ``MSAM.refine`` whose iteration t predicts ``masks[t]`` of the batch's label: "label", "empty"."""

    def refine(self, batch, iterations, mode="auto", embedding=None, start=None, click_mode=None):
        truth = batch["label"][:, None].float() * 40 - 20  # logits: +20 inside the label, -20 outside
        return [truth if masks[min(t, len(masks) - 1)] == "label" else torch.full_like(truth, -20.0)
                for t in range(iterations)]

    return refine


def test_known_predictors_give_their_dice_at_each_iteration(msam_checkpoint, disc_pictures, tmp_path, monkeypatch):
    # perfect from the second iteration on: Dice 0 (every test picture has a disc), then 1, 1, 1
    monkeypatch.setattr(MSAM, "refine", _scripted(["empty", "label"]))
    result = evaluate_refinement(msam_checkpoint, disc_pictures, tmp_path / "a", iterations=4, modes=["simulate"])
    assert list(result["mean"]) == ["simulate"]
    assert result["mean"]["simulate"] == [0.0, 1.0, 1.0, 1.0]
    assert all(curve["simulate"] == [0.0, 1.0, 1.0, 1.0] for curve in result["per_case"].values())


def test_bad_modes_and_iterations_are_refused(msam_checkpoint, disc_pictures, tmp_path):
    with pytest.raises(ConfigError, match="modes"):
        evaluate_refinement(msam_checkpoint, disc_pictures, tmp_path, modes=["clicks"])
    with pytest.raises(ConfigError, match="iterations"):
        evaluate_refinement(msam_checkpoint, disc_pictures, tmp_path, iterations=0)
    assert not any(tmp_path.iterdir())
