"""The domain-generalisation protocol end to end (evaluate_domain_generalisation) with predictors whose masks are
known: a perfect one scores Dice 1 on every domain, an empty one 0, and the written table holds the same rows."""

from __future__ import annotations

import json

import pytest
import torch

from samadapt.evaluation.protocols.domain_generalisation import evaluate_domain_generalisation
from samadapt.methods.decoder import DecoderBaseline
from synthetic import write_disc_pictures


@pytest.fixture(scope="module")
def decoder_run(train_tiny):
    return train_tiny("decoder")


def _fixed(kind):
    def predict(self, batch):
        fg = (batch["label"] > 0).float() if kind == "perfect" else torch.zeros(batch["label"].shape)
        return torch.stack([1 - fg, fg], dim=1)

    return predict


@pytest.mark.parametrize("kind, dice", [("perfect", 1.0), ("empty", 0.0)])
def test_known_predictors_score_their_dice_on_every_domain(decoder_run, disc_pictures, tmp_path, monkeypatch, kind,
                                                           dice):
    (tmp_path / "other").mkdir()
    other = write_disc_pictures(tmp_path / "other", 3, (48, 48), seed=9, name="o{}", centre=(14, 34, 14, 34),
                                radius=(5, 10))
    monkeypatch.setattr(DecoderBaseline, "predict", _fixed(kind))
    out = tmp_path / "dg"
    rows = evaluate_domain_generalisation(decoder_run, [f"other={other}"], out, device="cpu", use_cache=False)
    assert [(r["target"], r["domain"], r["cases"]) for r in rows] == [
        (f"{disc_pictures.name} (source)", "source", 2), ("other", "target", 3)]
    assert [(r["dice"], r["dice_std"], r["iou"]) for r in rows] == [(dice, 0.0, dice)] * 2
    table = json.loads((out / "dg_table.json").read_text())
    assert [(r["target"], r["dice"]) for r in table["rows"]] == [(r["target"], r["dice"]) for r in rows]
    per_case = (out / "dg_per_case.csv").read_text().strip().splitlines()
    assert len(per_case) == 1 + 2 + 3  # header, the source's test cases, the target's cases
