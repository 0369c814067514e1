import pytest
import torch

import samadapt.engine.fast as fast
from samadapt.backbones import build_backbone
from samadapt.config.run_config import TrainConfig, check_config, load_config
from samadapt.engine.fast import resolve_amp
from samadapt.engine.predict import Predictor
from samadapt.data.preprocessing import IntensityConfig
from samadapt.engine.trainer import Trainer
from samadapt.errors import ConfigError
from samadapt.methods import build_method
from synthetic import Discs

CPU = torch.device("cpu")


def _method():
    torch.manual_seed(0)
    return build_method("decoder", build_backbone("tiny"), {}, 1)


@pytest.mark.parametrize("native", [True, False])
def test_auto_is_bf16_exactly_where_the_cpu_computes_it_natively(monkeypatch, native):
    monkeypatch.setattr(fast, "cpu_bf16_native", lambda: native)
    assert resolve_amp("auto", CPU) == ("bf16" if native else "none")
    assert TrainConfig().amp == "auto"
    assert Trainer(_method(), TrainConfig(), "unused", {}, CPU).amp == ("bf16" if native else "none")
    for explicit in ("none", "bf16"):  # the option overrides the capability
        assert Trainer(_method(), TrainConfig(amp=explicit), "unused", {}, CPU).amp == explicit


def test_bf16_training_lowers_the_loss(tmp_path):
    cfg = TrainConfig(epochs=5, batch_size=4, lr=1e-3, seed=3, amp="bf16")
    history = Trainer(_method(), cfg, tmp_path / "run", {}, CPU).fit(Discs(16), Discs(4, seed=1)).history
    assert history[-1]["train_loss"] < 0.6 * history[0]["train_loss"]
    assert history[-1]["val_dice"] > 0.5


def test_amp_auto_is_a_valid_setting_and_a_bad_one_is_named():
    assert check_config(load_config("decoder_cpu", ["train.amp=auto"])).train.amp == "auto"
    with pytest.raises(ConfigError, match="train.amp"):
        check_config(load_config("decoder_cpu", ["train.amp=fp8"]))


def test_prediction_of_an_auto_run_keeps_the_exact_path_unless_fast_options_say_otherwise():
    assert Predictor(_method(), IntensityConfig(), amp="auto").amp == "none"
    assert Predictor(_method(), IntensityConfig(), amp="auto", fast=fast.FastOptions(bf16="on")).amp == "bf16"
