"""ONNX export: the exportable set, option-dependent refusal, bad files, int8, the CLI, LiteMedSAM end to end.

Every registered method exports within ONNX_TOLERANCE or is refused as it declares: tests/methods/test_contract.py."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from samadapt.backbones import build_backbone
from samadapt.cli import app
from samadapt.data.preprocessing import IntensityConfig
from samadapt.engine.export import (INT8_AGREEMENT, INT8_TOLERANCE, ONNX_TOLERANCE, OnnxPredictor, export_onnx,
                                    export_predictor, quantize_int8, read_metadata)
from samadapt.engine.predict import Predictor
from samadapt.errors import ConfigError, InputError
from samadapt.methods import METHODS, build_method
from support import make_method, onnx_difference
from synthetic import write_disc_pictures

EXPORTABLE = [n for n in METHODS.names() if METHODS.get(n).export_refusal is None]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_exportable_set_is_what_the_docs_say():
    assert EXPORTABLE == ["box-prompt", "decoder", "hetersam", "hsam", "msam", "samed", "unet"]


def test_msam_with_a_pool_grid_that_does_not_divide_is_refused(tmp_path):
    """M-SAM's automatic chain exports when the MEA's pooled grid divides the embedding grid (adaptive pooling is
    then a plain average pool); otherwise refused up front, naming the option, nothing written."""
    backbone = build_backbone("tiny")
    side = backbone.embed_grid[0]
    assert build_method("msam", backbone, {"mea_pool_size": side // 2}, 1).why_not_exportable() is None
    method = build_method("msam", backbone, {"mea_pool_size": side - 1}, 1)
    with pytest.raises(ConfigError, match="mea_pool_size.*not a divisor"):
        export_onnx(method, tmp_path / "m.onnx")
    assert not list(tmp_path.iterdir())


def test_box_prompt_gt_mode_refused(tmp_path):
    method = build_method("box-prompt", build_backbone("tiny"), {"mode": "gt"}, 1)
    with pytest.raises(ConfigError, match="mode='gt'.*ground-truth labels"):
        export_onnx(method, tmp_path / "m.onnx")


def test_bad_onnx_files(tmp_path):
    with pytest.raises(InputError, match="no such ONNX model"):
        OnnxPredictor(tmp_path / "missing.onnx")
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"not a model")
    with pytest.raises(InputError, match="junk.onnx: not a readable ONNX model"):
        OnnxPredictor(junk)
    plain = tmp_path / "plain.onnx"
    torch.onnx.export(torch.nn.Linear(2, 2), (torch.zeros(1, 2),), str(plain), dynamo=False)
    with pytest.raises(InputError, match="no samadapt metadata"):
        OnnxPredictor(plain)


@pytest.fixture(scope="module")
def picture_folder(tmp_path_factory) -> Path:
    """images/ + masks/ with 8 gray 70x90 pictures holding one bright disc each."""
    return write_disc_pictures(tmp_path_factory.mktemp("pictures"), 8, (70, 90), 1, "p{}", (20, 50, 20, 70), (8, 16))


def _cli(*args: str) -> str:
    result = CliRunner().invoke(app, list(args))
    assert result.exit_code == 0, f"samadapt {' '.join(args)}: {result.output}\n{result.exception!r}"
    return result.output


def _masks(folder: Path) -> dict[str, np.ndarray]:
    return {p.name: np.asarray(Image.open(p)) for p in sorted(folder.glob("*.png"))}


def test_cli_export_and_predict_onnx(picture_folder, tmp_path):
    """train (1 epoch, tiny) -> export --run -> predict --onnx gives the masks of predict --run (and --fast)."""
    run = tmp_path / "run"
    _cli("train", "--data", str(picture_folder), "--out", str(run), "--epochs", "1", "--backbone", "tiny",
         "--method", "decoder", "--device", "cpu", "--set", "data.cache=off", "--set", "data.empty_ratio=null",
         "--set", "train.batch_size=4")
    model = tmp_path / "model.onnx"
    assert "max |diff|" in _cli("export", str(model), "--run", str(run))
    images = str(picture_folder / "images")
    _cli("predict", images, "--run", str(run), "--out", str(tmp_path / "torch"), "--device", "cpu")
    said = _cli("predict", images, "--run", str(run), "--out", str(tmp_path / "fast"), "--device", "cpu", "--fast",
                "--bf16", "off")  # fp32 fast options: held to the fp32 masks on every CPU
    assert "fast path on cpu" in said and "; fp32" in said
    manifest = json.loads((tmp_path / "fast" / "prediction.json").read_text())
    assert manifest["prediction"]["amp"] == "none" and manifest["prediction"]["fast"]["bf16"] == "off"
    assert manifest["model"].endswith("best.safetensors") and len(manifest["cases"]) == 8
    assert isinstance(manifest["cpu"]["bf16_native"], bool) and "simd" in manifest["cpu"]
    _cli("predict", images, "--onnx", str(model), "--out", str(tmp_path / "onnx"), "--batch-size", "3")
    ref, fast, onnx = (_masks(tmp_path / d) for d in ("torch", "fast", "onnx"))
    assert len(ref) == 8 and ref.keys() == onnx.keys() == fast.keys()
    for name in ref:  # labels can only differ where a probability is within the tolerance of the 0.5 boundary
        assert (ref[name] != onnx[name]).mean() <= 1e-3 and (ref[name] != fast[name]).mean() <= 1e-3
    result = CliRunner().invoke(app, ["predict", images, "--onnx", str(model), "--run", str(run), "--out", "x"])
    assert result.exit_code != 0 and "cannot be combined" in result.output
    int8 = tmp_path / "int8.onnx"
    assert "int8; classes agree with fp32" in _cli("export", str(int8), "--run", str(run), "--int8")
    meta = read_metadata(int8)
    assert meta["quantization"].startswith("int8") and meta["int8_check_mean_abs_error"] <= INT8_TOLERANCE
    assert int8.stat().st_size < model.stat().st_size
    _cli("predict", images, "--onnx", str(int8), "--out", str(tmp_path / "int8"))
    assert _masks(tmp_path / "int8").keys() == ref.keys()  # class agreement: the LiteMedSAM test below


def test_int8_refused_below_its_agreement(tmp_path):
    model = tmp_path / "m.onnx"
    export_predictor(Predictor(make_method("decoder", build_backbone("tiny")), IntensityConfig(), axis=0), model)
    with pytest.raises(ConfigError, match="int8 model's probabilities differ"):
        quantize_int8(model, tmp_path / "m8.onnx", tolerance=0.0)
    assert not (tmp_path / "m8.onnx").exists()


def test_cli_export_errors(tmp_path):
    result = CliRunner().invoke(app, ["export", str(tmp_path / "m.onnx"), "--config", "msam_cpu",
                                      "--set", "backbone.name=tiny"])
    assert result.exit_code == 2 and "method 'msam'" in result.output and "checkpoint" in result.output
    result = CliRunner().invoke(app, ["export", str(tmp_path / "m.onnx"), "--config", "box_prompt_gt",
                                      "--set", "backbone.name=tiny"])
    assert result.exit_code == 2 and "cannot be exported to ONNX" in result.output
    assert not (tmp_path / "m.onnx").exists()


@pytest.mark.integration
def test_onnx_litemedsam_decoder(real_brain_batch, tmp_path):
    """The real encoder (TinyViT, 256 px) + decoder head end to end: ONNX Runtime within tolerance of PyTorch."""
    torch.manual_seed(0)
    method = build_method("decoder", build_backbone("litemedsam"), {}, 1).eval()
    items = [{"image": im.float()} for im in real_brain_batch["image"][:3]]
    assert onnx_difference(method, tmp_path / "lite.onnx", items) <= ONNX_TOLERANCE
    quantize_int8(tmp_path / "lite.onnx", tmp_path / "lite8.onnx")  # int8: classes on real slices, not probabilities
    fp32, int8 = (torch.stack(OnnxPredictor(tmp_path / f, batch_size=3).predict_probabilities(items)).argmax(1)
                  for f in ("lite.onnx", "lite8.onnx"))
    agreement = (fp32 == int8).float().mean().item()
    print(f"int8 vs fp32 class agreement on {len(items)} real slices: {agreement:.4f}")
    assert agreement >= INT8_AGREEMENT
