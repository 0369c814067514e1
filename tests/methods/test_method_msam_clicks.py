"""M-SAM with simulated clicks outside the refinement protocol: validation / model selection (``validation_clicks``),
``Predictor.use_clicks`` (``samadapt predict --clicks`` / ``evaluate dg --clicks``) and the paper preset."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from samadapt.config.run_config import load_config
from samadapt.data.cases import Case
from samadapt.data.preprocessing import IntensityConfig
from samadapt.data.slices import collate
from samadapt.engine.predict import Predictor
from samadapt.engine.validation import validate
from samadapt.errors import ConfigError, InputError
from support import discs_batch, make_method
from synthetic import Discs


def _record_modes(method, monkeypatch) -> list[tuple[int, str]]:
    seen = []
    original = method.refine
    monkeypatch.setattr(method, "refine", lambda b, n, mode="auto", *a, **kw: seen.append((n, mode))
                        or original(b, n, mode, *a, **kw))
    return seen


@pytest.mark.parametrize("clicks", [0, 2])
def test_validation_runs_the_simulated_click_chain_when_asked(tiny_backbone, monkeypatch, clicks):
    method = make_method("msam", tiny_backbone, validation_clicks=clicks)
    seen = _record_modes(method, monkeypatch)
    ds = list(Discs(3, 64, 1, 0))
    result = validate(method, ds, collate, lambda b: b, 2, "none", torch.device("cpu"))
    assert 0.0 <= result["dice"] <= 1.0 and np.isfinite(result["loss"])
    if clicks:  # loss and Dice from one chain of 2 simulated clicks per batch, never the automatic mode
        assert seen == [(2, "simulate")] * 2
    else:  # forward (loss) and predict (Dice): the automatic mode
        assert seen == [(3, "auto")] * 4
    assert method.training  # validate hands the method back in train mode


def test_clicks_output_scores_what_the_clicks_give(tiny_backbone):
    method = make_method("msam", tiny_backbone).eval()
    batch = discs_batch()
    with torch.no_grad():
        out = method.clicks_output(batch, 3)
        low = tiny_backbone.low_res_size
        assert out["iterations"].shape == (2, 3, low, low) and torch.equal(out["logits"], out["iterations"][:, 2:])
        expected = method.predict_iterations(batch, 3, "simulate")[-1]
        assert torch.allclose(method.output_probabilities(out), expected, atol=1e-6)
    with pytest.raises(InputError, match="labels"):
        method.clicks_output({"image": batch["image"]}, 2)


def _case(label: bool) -> Case:
    rng = np.random.default_rng(0)
    image = rng.random((1, 3, 40, 48), dtype=np.float32)
    mask = np.zeros((3, 40, 48), dtype=np.uint8)
    mask[:, 10:25, 12:30] = 1
    return Case("c1", image, mask if label else None, source="c1.nii.gz", modality="MR")


def test_predictor_with_clicks_simulates_from_the_label_and_refuses_without(tiny_backbone, monkeypatch):
    method = make_method("msam", tiny_backbone)
    predictor = Predictor(method, IntensityConfig(), batch_size=2).use_clicks(2)
    seen = _record_modes(predictor.method, monkeypatch)
    pred = predictor.predict_case(_case(label=True))
    assert pred.shape == (3, 40, 48)
    assert seen == [(2, "simulate")] * 2  # 3 slices in batches of 2
    assert predictor.describe()["clicks"] == 2
    with pytest.raises(InputError, match="c1.nii.gz: --clicks 2 .* no label"):
        predictor.predict_cases([_case(label=False)])
    plain = Predictor(method, IntensityConfig(), batch_size=2).use_clicks(0)
    seen.clear()
    plain.predict_case(_case(label=False))
    assert seen and all(mode == "auto" for _, mode in seen)


def test_clicks_are_refused_for_methods_without_them(tiny_backbone):
    predictor = Predictor(make_method("decoder", tiny_backbone), IntensityConfig())
    with pytest.raises(ConfigError, match="'decoder' does not refine with simulated clicks"):
        predictor.use_clicks(3)
    with pytest.raises(ConfigError, match="expected >= 0"):
        predictor.use_clicks(-1)


def test_paper_preset_trains_on_clicks_only_and_validates_with_clicks():
    options = load_config("msam_paper").method.options
    assert options["auto_train_fraction"] == 0.0 and options["validation_clicks"] == 5
