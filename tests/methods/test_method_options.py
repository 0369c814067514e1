"""Typed method options: coercion by annotation, allowed values from field metadata, one ConfigError naming the key."""

import dataclasses
import re
from typing import Literal

import pytest

from samadapt.config.run_config import load_config, preset_dir
from samadapt.errors import ConfigError
from samadapt.methods import METHODS, MethodConfig, build_method
from samadapt.methods.base import config_from_dict
from samadapt.methods.options import option
from support import SMALL, run_cli


@dataclasses.dataclass
class Toy(MethodConfig):
    count: int = option(2, ge=1)
    rate: float = option(0.5, gt=0, le=1)
    flag: bool = False
    name: str = option("a", choices=("a", "b", "on"))
    kind: Literal["x", "y"] = "x"
    size: int | None = None
    sizes: list[int] = option([1, 2])
    pair: tuple[float, float] = (0.0, 1.0)
    layers: str | list[int] = "late"

    def check(self) -> None:
        if self.flag and self.count > 3:
            raise ConfigError("toy: flag needs count <= 3")


def test_strings_from_set_are_coerced_to_the_field_types():
    cfg = config_from_dict(Toy, {"count": "3", "rate": "0.25", "flag": "true", "name": "on", "kind": "y",
                                 "size": "null", "sizes": "[4, 5]", "pair": "[1, 2]", "layers": "[0, 3]"})
    assert (cfg.count, cfg.rate, cfg.flag, cfg.name, cfg.kind, cfg.size) == (3, 0.25, True, "on", "y", None)
    assert type(cfg.count) is int and type(cfg.rate) is float  # "on" stays text, not YAML 1.1's True
    assert cfg.sizes == [4, 5] and cfg.pair == (1.0, 2.0) and type(cfg.pair[0]) is float
    assert cfg.layers == [0, 3] and config_from_dict(Toy, {"layers": "deep"}).layers == "deep"
    assert config_from_dict(Toy, {"rate": "3e-1"}).rate == 0.3  # YAML 1.1 reads "3e-1" (no dot) as text
    assert config_from_dict(Toy, {"count": 4.0}).count == 4 and config_from_dict(Toy, {"size": "7"}).size == 7
    assert Toy().sizes is not Toy().sizes  # a list default is copied per instance


@pytest.mark.parametrize("values,message", [
    ({"count": "three"}, "method.options.count: expected an integer, got 'three'"),
    ({"count": "2.5"}, "method.options.count: expected an integer, got '2.5'"),
    ({"count": True}, "method.options.count: expected an integer, got True"),
    ({"rate": "fast"}, "method.options.rate: expected a number, got 'fast'"),
    ({"flag": "1"}, "method.options.flag: expected true/false, got '1'"),
    ({"kind": "z"}, "method.options.kind: expected one of 'x', 'y', got 'z'"),
    ({"size": "big"}, "method.options.size: expected an integer or null, got 'big'"),
    ({"sizes": "[1, x]"}, "method.options.sizes[1]: expected an integer, got 'x'"),
    ({"sizes": "3"}, "method.options.sizes: expected a list, got '3'"),
    ({"pair": "[1, 2, 3]"}, "method.options.pair: expected a list of 2 values, got '[1, 2, 3]'"),
    ({"count": "0"}, "method.options.count=0 is out of range: expected >= 1"),
    ({"rate": "0"}, "method.options.rate=0.0 is out of range: expected > 0 and <= 1"),
    ({"rate": 1.5}, "method.options.rate=1.5 is out of range: expected > 0 and <= 1"),
    ({"name": "c"}, "method.options.name='c' is not allowed: expected one of 'a', 'b', 'on'"),
    ({"flag": True, "count": 5}, "toy: flag needs count <= 3"),
    ({"cuont": 1}, "unknown option(s) ['cuont'] for Toy; valid: ["),
])
def test_wrong_values_raise_one_config_error_naming_the_key(values, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        config_from_dict(Toy, values)


def _bad_values(cls) -> list[tuple[str, object]]:
    """(key, a value of the wrong type) and (key, a value outside the allowed ones) for config class ``cls``."""
    fields = dataclasses.fields(cls)
    typed = [f for f in fields if f.type in ("int", "float", "bool", "int | None", "float | None")]
    wrong_type = (typed[0].name, "not-a-value") if typed else (fields[0].name, [1, 2])  # a str field: a list
    allowed = next(f for f in fields if f.metadata)
    meta = allowed.metadata
    if "choices" in meta:
        choices = meta["choices"]
        bad = "no-such-choice" if isinstance(choices[0], str) else max(choices) + 1
    elif "ge" in meta:
        bad = meta["ge"] - 1
    elif "gt" in meta:
        bad = meta["gt"]
    else:
        bad = meta.get("le", meta.get("lt")) + 1
    return [wrong_type, (allowed.name, bad)]


@pytest.mark.parametrize("name", METHODS.names())
def test_every_method_checks_its_options_when_the_config_is_loaded_and_built(name, tiny_backbone):
    """A wrong type and a value outside the allowed ones, through ``--set`` (load_config) and through build."""
    for key, value in _bad_values(METHODS.get(name).config_class):
        with pytest.raises(ConfigError) as built:
            build_method(name, tiny_backbone, {**SMALL.get(name, {}), key: value})
        assert f"method.options.{key}" in str(built.value) and str(value) in str(built.value)
        if not isinstance(value, list):  # text from the command line: "[1, 2]" is a fine string
            with pytest.raises(ConfigError) as loaded:
                load_config(None, [f"method.name={name}", f"method.options.{key}={value}"])
            assert str(loaded.value) == str(built.value)


@pytest.mark.parametrize("name,override,message", [
    ("box-prompt", "mode=grid", "method.options.mode='grid' is not allowed: expected one of 'gt', 'whole'"),
    ("decoder", "num_tokens=two", "method.options.num_tokens: expected an integer, got 'two'"),
    ("desam", "bg_point_prob=1.5", "method.options.bg_point_prob=1.5 is out of range: expected >= 0 and <= 1"),
    ("desam", "channels=[64, x, 16]", "method.options.channels[1]: expected an integer, got 'x'"),
    ("hetersam", "light_decoder=maybe", "method.options.light_decoder: expected true/false, got 'maybe'"),
    ("hetersam", "swin_preset=huge", "method.options.swin_preset='huge' is not allowed: expected one of 'tiny', "
                                     "'base'"),
    ("hsam", "inference_stage=4", "method.options.inference_stage=4 is not allowed: expected one of 1, 2, 3"),
    ("hsam", "lora_rank=2.5", "method.options.lora_rank: expected an integer, got '2.5'"),
    ("msam", "lora_rank=-1", "method.options.lora_rank=-1 is out of range: expected >= 0"),
    ("msam", "click_mode=edge", "method.options.click_mode='edge' is not allowed: expected one of 'random', "
                                "'center'"),
    ("promise", "anchor_radius=0.8", "method.options.anchor_radius=0.8 is out of range: expected > 0 and <= 0.5"),
    ("promise", "feature_grid=wide", "method.options.feature_grid: expected an integer or null, got 'wide'"),
    ("samed", "block_order=reversed", "method.options.block_order='reversed' is not allowed: expected one of "
                                      "'sam', 'hsam'"),
    ("unet", "dropout=1.5", "method.options.dropout=1.5 is out of range: expected >= 0 and <= 1"),
])
def test_messages_say_the_key_the_value_and_what_is_allowed(name, override, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(None, [f"method.name={name}", f"method.options.{override}"])


def test_option_overrides_are_typed_by_the_method_named_last():
    cfg = load_config(None, ["method.options.lora_rank=3", "method.options.feature_noise=3e-3",
                             "method.options.lora_targets=[blocks.0.attn.qkv]", "method.name=hsam"])
    assert cfg.method.options == {"lora_rank": 3, "feature_noise": 0.003, "lora_targets": ["blocks.0.attn.qkv"]}
    cfg = load_config("hetersam_cpu", ["method.options.depths=[1, 1]", "method.options.drop_path=0"])
    assert cfg.method.options["depths"] == (1, 1) and cfg.method.options["num_heads"] == (1, 2, 4, 8)
    assert type(cfg.method.options["drop_path"]) is float
    cfg = load_config("promise_paper", ["method.options.feature_layers=[0, 3]"])
    assert cfg.method.options["feature_layers"] == [0, 3] and cfg.method.options["feature_grid"] is None
    assert cfg.method.options["point_labels"] == "1-1-1-1-1-1-1-1-0-0-0-0-0-0-0-0"


def test_checks_that_relate_several_options():
    with pytest.raises(ConfigError, match="inference_decoder='light' needs light_decoder=true"):
        load_config("hetersam_cpu", ["method.options.light_decoder=false", "method.options.inference_decoder=light"])
    with pytest.raises(ConfigError, match="point_labels must hold 8 values"):
        load_config("promise_cpu", ["method.options.num_points=8", "method.options.point_labels=1-0"])
    with pytest.raises(ConfigError, match="unknown option"):
        load_config("decoder_cpu", ["method.options.num_tokns=3"])


def test_run_config_sections_share_the_coercion():
    cfg = load_config(None, ["train.epochs=2.0", "data.fewshot=10", "backbone.checkpoint=null", "data.path=2024",
                             "data.cache=off", "data.percentiles=[1, 99]"])
    assert cfg.train.epochs == 2 and type(cfg.train.epochs) is int
    assert type(cfg.data.fewshot) is int and load_config(None, ["data.fewshot=0.1"]).data.fewshot == 0.1  # count|fraction
    assert cfg.backbone.checkpoint is None and cfg.data.path == "2024" and cfg.data.cache == "off"
    assert cfg.data.percentiles == (1.0, 99.0)
    with pytest.raises(ConfigError, match=re.escape("train.patience: expected an integer or null, got 'soon'")):
        load_config(None, ["train.patience=soon"])


CHEAP = [p.stem for p in sorted(preset_dir().glob("*.yaml")) if not p.stem.startswith("hetersam")]  # Swin: seconds


@pytest.mark.parametrize("preset", [p.stem for p in sorted(preset_dir().glob("*.yaml"))])
def test_every_preset_loads_and_the_cheap_ones_build_on_tiny(preset, tiny_backbone):
    cfg = load_config(preset)
    assert load_config(preset, [f"method.options.{k}={v}" for k, v in cfg.method.options.items()
                                if isinstance(v, (int, float, str))]).method.options == cfg.method.options
    if preset in CHEAP:
        method = build_method(cfg.method.name, tiny_backbone, cfg.method.options)
        assert all(getattr(method.config, k) == v for k, v in cfg.method.options.items())


def test_cli_train_with_a_bad_option_exits_2_with_one_line(tmp_path):
    out = tmp_path / "run"
    bad = run_cli("train", "--data", str(tmp_path), "--backbone", "tiny", "--method", "hsam", "--out", str(out),
                  "--set", "method.options.inference_stage=4", check=False)
    assert bad.returncode == 2
    assert bad.stderr.strip() == ("error: method.options.inference_stage=4 is not allowed: expected one of 1, 2, 3"), \
        bad.stderr
    assert not out.exists()  # refused before anything was written
