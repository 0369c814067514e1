"""Facts a method declares about itself (presets, benchmark parts, export refusal) and that no table keyed by method
names lives outside samadapt/methods/."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest
import torch

import samadapt
from samadapt.backbones import build_backbone
from samadapt.bench.selection import measured_methods, preset
from samadapt.config.run_config import load_config, preset_dir
from samadapt.engine.export import check_exportable
from samadapt.errors import ConfigError
from samadapt.methods import METHODS, build_method
from support import SMALL

PACKAGE = Path(samadapt.__file__).resolve().parent
BENCHMARK_PARTS = ("latency", "cost")


@pytest.mark.parametrize("name", METHODS.names())
def test_every_declared_preset_is_a_bundled_file_that_runs_the_method(name):
    cls = METHODS.get(name)
    assert "cpu" in cls.presets, f"{name} declares no CPU preset"
    for purpose, preset_name in cls.presets.items():
        assert (preset_dir() / f"{preset_name}.yaml").is_file(), f"{name} {purpose}: {preset_name}.yaml missing"
        assert load_config(preset_name, []).method.name == name
        assert preset(name, purpose) == preset_name


def test_every_bundled_preset_is_declared_by_its_method():
    declared = {p for name in METHODS.names() for p in METHODS.get(name).presets.values()}
    assert declared == {p.stem for p in preset_dir().glob("*.yaml")}


@pytest.mark.parametrize("name", [n for n in METHODS.names() if METHODS.get(n).ablations or METHODS.get(n).rescorings])
def test_declared_ablations_and_rescorings_are_valid_options_that_change_the_method(name, tiny_backbone):
    cls = METHODS.get(name)
    base = load_config(preset(name, "cpu"), []).method.options
    for variant, overrides in {**cls.ablations, **cls.rescorings}.items():
        options = load_config(preset(name, "cpu"), list(overrides)).method.options
        assert options != base, f"{name} {variant}: its overrides change nothing"
        build_method(name, tiny_backbone, {**SMALL.get(name, {}), **options}, 1)
    assert not set(cls.ablations) & set(cls.rescorings)  # one row label each


def test_a_missing_purpose_is_a_clear_error():
    with pytest.raises(ConfigError, match="method 'unet' declares no 'paper' preset .*cpu=unet_cpu"):
        preset("unet", "paper")


@pytest.mark.parametrize("name", METHODS.names())
def test_benchmark_parts_are_known_and_measurable(name):
    cls = METHODS.get(name)
    assert set(cls.benchmark_parts) <= set(BENCHMARK_PARTS)
    if "cost" in cls.benchmark_parts:
        assert cls.trainable  # the cost part times training steps


def test_benchmark_defaults_are_the_methods_measured_before():
    assert measured_methods("latency") == ["box-prompt", "decoder", "desam", "hetersam", "hsam", "msam", "promise",
                                           "unet"]
    assert measured_methods("cost") == ["decoder", "desam", "hetersam", "hsam", "msam", "promise", "unet"]


def test_demo_and_accuracy_models_use_the_declared_presets(tmp_path, monkeypatch):
    from samadapt.bench import accuracy, demo

    seen = {}
    monkeypatch.setattr(demo, "_dataset", lambda out, name: out / "data" / name)
    monkeypatch.setattr(demo, "compare", lambda data, models, out, **kw: seen.update(models=models, **kw))
    demo.run_demo(tmp_path, "hetersam")
    assert [(m.label, m.config) for m in seen["models"]] == [
        ("hetersam", "hetersam_cpu"), ("unet", "unet_cpu"), ("box-prompt-gt", "box_prompt_gt")]
    assert seen["patience"] == demo.PATIENCE and "minutes" not in seen  # the convergence budget by default
    assert "data.fewshot=0.1" in seen["common"] and [name for name, _ in seen["targets"]] == [demo.SHIFT]
    assert accuracy.BINARY_MODELS[:5] == ("decoder=decoder_cpu", "unet=unet_cpu", "box-prompt-gt=box_prompt_gt",
                                          "box-prompt-whole=box_prompt_whole",
                                          "desam-box=desam_cpu method.options.mode=box")
    assert "samed=samed_cpu" in accuracy.MULTICLASS_MODELS and accuracy.DESAM_GRID == "desam-grid=desam_cpu"


@pytest.mark.parametrize("name", METHODS.names())
def test_export_refusal_is_what_the_export_check_says(name, tiny_backbone):
    cls = METHODS.get(name)
    options = {"mode": "whole"} if name == "box-prompt" else SMALL.get(name, {})
    method = build_method(name, tiny_backbone, options, 1)
    assert method.why_not_exportable() == cls.export_refusal
    if cls.export_refusal is None:
        check_exportable(method)  # tests/methods/test_contract.py exports it and compares with ONNX Runtime
    else:
        with pytest.raises(ConfigError) as err:
            check_exportable(method)
        assert str(err.value) == f"method {name!r} cannot be exported to ONNX: {cls.export_refusal}"


def test_option_dependent_export_refusal():
    method = build_method("box-prompt", build_backbone("tiny"), {"mode": "gt"}, 2)
    with pytest.raises(ConfigError, match="'box-prompt' cannot be exported to ONNX: with mode='gt' it needs "
                                          "ground-truth labels"):
        check_exportable(method)


def test_one_vs_rest_refuses_as_its_heads(tiny_backbone):
    method = build_method("desam", tiny_backbone, SMALL["desam"], 2)
    assert type(method).__name__ == "OneVsRest"
    assert method.why_not_exportable() == METHODS.get("desam").export_refusal


def method_keyed_dicts(path: Path, names: set[str]) -> list[str]:
    """``file:line: key`` for every dict literal in ``path`` with a registered method name as a key."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Dict):
            keys = [k.value for k in node.keys if isinstance(k, ast.Constant) and k.value in names]
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "dict":
            keys = [k.arg for k in node.keywords if k.arg in names]
        else:
            continue
        found += [f"{path}:{node.lineno}: {k!r}" for k in keys]
    return found


def test_no_table_keyed_by_method_names_outside_the_methods():
    names = set(METHODS.names())
    files = [PACKAGE / "cli.py"] + [p for part in ("config", "engine", "evaluation", "bench", "serve")
                                    for p in sorted((PACKAGE / part).rglob("*.py"))]
    assert len(files) > 20
    found = [hit for path in files for hit in method_keyed_dicts(path, names)]
    assert not found, "method facts belong on the method class:\n" + "\n".join(found)


def test_the_scan_finds_a_table_like_the_old_export_list(tmp_path):
    old = tmp_path / "export.py"
    old.write_text('NOT_TRACEABLE = {\n    "desam": "per image",\n    "msam": "adaptive pool",\n}\n'
                   'MODE = dict(promise="fixed batch")\n', encoding="utf-8")
    hits = method_keyed_dicts(old, set(METHODS.names()))
    assert [h.split(": ", 1)[1] for h in hits] == ["'desam'", "'msam'", "'promise'"]


# --- what a method needs from the backbone: LoRA targets --------------------------------------------------------------
def test_backbones_declare_lora_targets_that_match_their_qkv_layers(tiny_backbone):
    from fnmatch import fnmatch

    from torch import nn

    lite = build_backbone("litemedsam", pretrained=False)
    for backbone in (tiny_backbone, lite):
        linear = [n for n, m in backbone.image_encoder.named_modules() if isinstance(m, nn.Linear)]
        matched = [n for n in linear if any(fnmatch(n, p) for p in backbone.lora_targets)]
        assert matched and all(n.endswith("attn.qkv") for n in matched)
        assert len(matched) == len([n for n in linear if n.endswith("attn.qkv")])


@pytest.mark.parametrize("name", ["hsam", "samed", "msam"])
def test_lora_methods_read_the_backbones_targets_and_the_option_overrides(name, tiny_backbone):
    import copy

    small = {"mea_pool_size": 8} if name == "msam" else {}
    method = build_method(name, tiny_backbone, small, 1)
    assert sorted(method.lora_layers) == [f"blocks.{i}.attn.qkv" for i in range(4)]
    bare = copy.copy(tiny_backbone)
    bare.lora_targets = ()
    with pytest.raises(ConfigError, match=f"{name}: backbone 'tiny' declares no LoRA targets; set "
                                          "method.options.lora_targets"):
        build_method(name, bare, small, 1)
    method = build_method(name, bare, {**small, "lora_targets": ["blocks.1.attn.qkv"]}, 1)
    assert method.lora_layers == ["blocks.1.attn.qkv"]


# --- one registration style; third-party plugins through entry points ------------------------------------------------
PLUGIN = '''
from samadapt.backbones import BACKBONES
from samadapt.backbones.tiny import TinySAM
from samadapt.data.readers import READERS
from samadapt.data.readers.folder2d import Folder2DSource
from samadapt.methods import METHODS
from samadapt.methods.decoder import DecoderBaseline


@BACKBONES.register
class PluginBackbone(TinySAM):
    name = "plugin-tiny"


@METHODS.register
class PluginMethod(DecoderBaseline):
    name = "plugin-decoder"


@READERS.register
class PluginSource(Folder2DSource):
    format = "plugin-folder"
'''


@pytest.fixture
def registries(monkeypatch):
    """The three registries, restored afterwards (plugins registered by a test do not leak into others)."""
    from samadapt.backbones import BACKBONES
    from samadapt.data.readers import READERS

    for registry in (BACKBONES, METHODS, READERS):
        monkeypatch.setattr(registry, "_items", dict(registry._items))
        monkeypatch.setattr(registry, "_plugins_loaded", False)
    return BACKBONES, METHODS, READERS


def test_a_plugin_of_each_kind_registers_through_its_entry_points(registries, tmp_path, monkeypatch):
    import sys

    backbones, methods, readers = registries
    (tmp_path / "samadapt_test_plugin.py").write_text(PLUGIN, encoding="utf-8")
    info = tmp_path / "samadapt_test_plugin-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: samadapt-test-plugin\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[samadapt.backbones]\nb = samadapt_test_plugin\n[samadapt.methods]\n"
                                           "m = samadapt_test_plugin\n[samadapt.readers]\nr = samadapt_test_plugin\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "samadapt_test_plugin", raising=False)
    assert "plugin-tiny" not in backbones and "plugin-decoder" not in methods
    backbone = build_backbone("plugin-tiny")  # unknown among the built-ins: the entry points are loaded
    assert type(backbone).__name__ == "PluginBackbone" and backbone.name == "plugin-tiny"
    assert "plugin-decoder" in methods.names() and "plugin-folder" in readers.names()
    method = build_method("plugin-decoder", backbone, {}, 1)
    assert method.predict({"image": torch.rand(1, 3, 64, 64)}).shape == (1, 2, 64, 64)
    assert readers.get("plugin-folder").__name__ == "PluginSource"


def test_registration_takes_the_class_and_its_declared_name(registries):
    from samadapt.backbones.base import Backbone
    from samadapt.data.readers.base import DatasetSource
    from samadapt.methods.base import Method

    backbones, methods, readers = registries
    with pytest.raises(ConfigError, match="takes a Method subclass"):
        methods.register("my-method")  # the old call style with a name
    with pytest.raises(ConfigError, match="declares no 'name'"):
        methods.register(type("Nameless", (Method,), {}))
    with pytest.raises(ConfigError, match="declares no 'format'"):
        readers.register(type("Nameless", (DatasetSource,), {}))
    with pytest.raises(ConfigError, match="backbone 'tiny' is registered twice"):
        backbones.register(type("OtherTiny", (Backbone,), {"name": "tiny"}))
    cls = readers.register(type("Mine", (DatasetSource,), {"format": "mine"}))
    assert readers.get("mine") is cls


# --- which prompts a frozen decoder follows ---------------------------------------------------------------------------
def test_backbones_declare_the_prompts_their_decoder_was_trained_with():
    from samadapt.backbones import BACKBONES

    assert BACKBONES.get("litemedsam").trained_prompts == ("boxes",)  # MedSAM-Lite: boxes only
    assert BACKBONES.get("sam_med3d").trained_prompts == ("points", "masks")  # clicks and the previous mask
    for name in ("mobilesam", "sam_vit_b", "tiny"):
        assert set(BACKBONES.get(name).trained_prompts) == {"points", "boxes", "masks"}


@pytest.mark.parametrize("name, options, warned", [("promise", {}, True), ("promise", {"mode": "ips_gt"}, True),
                                                    ("decoder", {}, False), ("box-prompt", {}, False)])
def test_a_method_warns_when_it_prompts_a_frozen_decoder_with_what_it_never_saw(name, options, warned, tiny_backbone,
                                                                                 monkeypatch):
    """ProMISe's points steer the frozen decoder: on a backbone trained with boxes only it says so (one-vs-rest
    models as their heads); methods that train the decoder or prompt it with boxes do not."""
    assert build_method(name, tiny_backbone, {**SMALL.get(name, {}), **options}, 1).backbone_note() is None
    monkeypatch.setattr(tiny_backbone, "trained_prompts", ("boxes",))
    for k in (1, 2) if name != "box-prompt" else (1,):
        note = build_method(name, tiny_backbone, {**SMALL.get(name, {}), **options}, k).backbone_note()
        assert (note is not None) == warned
        if warned:
            assert "frozen mask decoder with points" in note and "'tiny' was trained with boxes only" in note


def test_training_prints_the_backbone_warning(tmp_path, monkeypatch, capsys):
    from samadapt.backbones.tiny import TinySAM
    from samadapt.config.run_config import load_config
    from samadapt.engine.run import train
    from synthetic import write_disc_pictures

    (tmp_path / "discs").mkdir()
    data = write_disc_pictures(tmp_path / "discs", 6, (64, 64), seed=1, name="d{:02d}", centre=(18, 46, 18, 46),
                               radius=(8, 14))
    monkeypatch.setattr(TinySAM, "trained_prompts", ("boxes",))
    sets = [f"method.options.{k}={json.dumps(v)}" for k, v in SMALL["promise"].items()]
    train(load_config(None, ["backbone.name=tiny", "method.name=promise", *sets, f"data.path={data}",
                             "data.cache=off", "data.empty_ratio=null", "train.epochs=1", "train.batch_size=4",
                             "train.device=cpu", f"output={tmp_path / 'run'}"]))
    assert "warning: promise prompts the frozen mask decoder with points" in " ".join(capsys.readouterr().err.split())
