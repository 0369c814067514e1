"""The HeterSAM light-decoder protocol (evaluate_light_decoder): one row per case, class and decoder path, whose
Dice is the method's own prediction through that decoder, and speed ratios against the full path."""

from __future__ import annotations

import json

import pytest
import torch

from samadapt.data.readers import open_dataset
from samadapt.data.slices import collate, reassemble, volume_slices
from samadapt.engine.predict import Predictor
from samadapt.errors import ConfigError
from samadapt.evaluation.metrics import compute_metrics
from samadapt.evaluation.protocols.light_decoder import COLUMNS, evaluate_light_decoder


@pytest.fixture(scope="module")
def hetersam_run(train_tiny):
    return train_tiny("hetersam", light_decoder=True)


def test_light_decoder_rows_match_the_methods_own_predictions(hetersam_run, disc_pictures, tmp_path):
    out = tmp_path / "light"
    rows = evaluate_light_decoder({"h": hetersam_run}, out, timing_slices=2, batch_size=2)
    cases = list(open_dataset(disc_pictures).make_split().test)
    assert [(r["case"], r["path"], r["class"]) for r in rows] == [
        (c, p, 1) for c in cases for p in ("full", "light")]
    predictor = Predictor.from_checkpoint(hetersam_run / "checkpoints" / "best.safetensors", device="cpu")
    source = open_dataset(disc_pictures)
    with torch.inference_mode():
        for r in rows:
            case = source.load(r["case"])
            slices = volume_slices(case, predictor.axis, predictor.method.input_size, predictor.intensity)
            probs = predictor.method.eval().predict(collate([slices[i] for i in range(len(slices))]),
                                                    decoder=r["path"])
            pred = reassemble(list(probs), predictor.axis, case)
            expected = compute_metrics(pred, case.label, classes=[1], spacing=case.spacing, metrics=("dice",))
            assert r["dice"] == pytest.approx(expected[1]["dice"], abs=1e-6)
    for r in rows:
        assert r["end_to_end_s"] == pytest.approx(r["encoder_s"] + r["prompt_fusion_s"] + r["decoder_s"])
        assert r["slices"] == len(cases)
        if r["path"] == "full":
            assert r["decoder_vs_full"] == r["post_encoder_vs_full"] == r["end_to_end_vs_full"] == 1.0
    saved = json.loads((out / "results.json").read_text())  # (HD95 of an empty prediction is NaN: compare keys)
    assert [(r["case"], r["path"], r["dice"], r["decoder_s"]) for r in saved] == \
        [(r["case"], r["path"], r["dice"], r["decoder_s"]) for r in rows]
    text = (out / "results.md").read_text()
    assert "| " + " | ".join(COLUMNS) + " |" in text and text.count("\n| h | ") == len(rows)


def test_a_run_of_another_method_is_refused(train_tiny, tmp_path):
    run = train_tiny("decoder")
    with pytest.raises(ConfigError, match="expected hetersam"):
        evaluate_light_decoder({"d": run}, tmp_path / "out")
    assert not (tmp_path / "out").exists()
