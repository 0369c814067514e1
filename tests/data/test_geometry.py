"""The resize routes (``data.resize``): SAM's longest side + padding, ProMISe's stretch, DeSAM's 256 -> S."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from samadapt.backbones import build_backbone
from samadapt.config.run_config import check_config, load_config
from samadapt.data.cases import Case
from samadapt.data.preprocessing import (Geometry, IntensityConfig, PadInfo, pad_info_for, resize_pad,
                                         resize_pad_label, restore)
from samadapt.data.slices import SliceDataset, reassemble, volume_slices
from samadapt.engine.predict import Predictor
from samadapt.engine.run import geometry_config
from samadapt.errors import ConfigError
from support import make_method

STRETCH, VIA = Geometry("stretch"), Geometry("stretch", via=32)


def test_routes_shapes_and_pad_info():
    image = torch.rand(1, 30, 50)
    out, info = resize_pad(image, 64)
    assert info == PadInfo(30, 50, 38, 64, 64) == pad_info_for(30, 50, 64)
    assert out.shape == (3, 64, 64) and out[:, 38:].abs().sum() == 0  # zero-padded bottom
    for geometry in (STRETCH, VIA):
        out, info = resize_pad(image, 64, geometry)
        assert info == PadInfo(30, 50, 64, 64, 64) == pad_info_for(30, 50, 64, geometry)
        assert out.shape == (3, 64, 64) and out.min() > 0  # the whole frame, no padding
        assert resize_pad_label(torch.ones(30, 50, dtype=torch.long), 64, geometry).min() == 1
    # via: exactly the two stretches in a row
    first, _ = resize_pad(image, 32, STRETCH)
    assert torch.allclose(resize_pad(image, 64, VIA)[0], resize_pad(first[:1], 64, STRETCH)[0])
    assert not torch.allclose(resize_pad(image, 64, VIA)[0], resize_pad(image, 64, STRETCH)[0])


def test_label_roundtrips_are_exact_when_upsampled():
    rng = np.random.default_rng(2)
    for h, w, s in [(37, 53, 64), (64, 64, 64), (20, 13, 64), (64, 7, 64), (197, 233, 256)]:
        label = torch.from_numpy(rng.integers(0, 4, (h, w)))
        for geometry in (Geometry(), STRETCH):
            resized = resize_pad_label(label, s, geometry)
            assert resized.shape == (s, s) and resized.dtype == torch.long
            back = restore(resized[None], pad_info_for(h, w, s, geometry), mode="nearest")[0]
            assert back.shape == (h, w) and torch.equal(back, label), (h, w, s, geometry)


def test_stretch_probabilities_restore_to_the_slice():
    probs = torch.full((2, 64, 64), 0.5)
    restored = restore(probs, pad_info_for(30, 50, 64, STRETCH))
    assert restored.shape == (2, 30, 50) and torch.allclose(restored, torch.full_like(restored, 0.5))


@pytest.mark.parametrize("kwargs, word", [({"resize": "crop"}, "unknown"), ({"via": 256}, "stretch"),
                                          ({"resize": "stretch", "via": 0}, ">= 1"),
                                          ({"resize": "stretch", "via": 2.5}, ">= 1")])
def test_bad_geometry(kwargs, word):
    with pytest.raises(ConfigError, match=word):
        Geometry(**kwargs)


def test_config_checks_and_presets():
    assert load_config("promise_paper").data.resize == "stretch"
    for name in ("desam_paper", "desam_paper_vit_h", "desam_prostate"):
        data = load_config(name).data
        assert geometry_config(data) == Geometry("stretch", via=256), name
    assert geometry_config(load_config("decoder_tiny").data) == Geometry()
    with pytest.raises(ConfigError, match="data.resize_via"):
        check_config(load_config("decoder_tiny", ["data.resize_via=256"]))
    with pytest.raises(ConfigError, match="data.resize="):
        check_config(load_config("decoder_tiny", ["data.resize=crop"]))


def _case(h: int = 24, w: int = 40) -> Case:
    label = np.zeros((2, h, w), dtype=np.uint8)
    label[:, 4:16, 10:34] = 1
    image = np.full((1, 2, h, w), 0.5, dtype=np.float32)
    return Case("c0", image, label)


def test_slice_dataset_stretch_fills_the_frame():
    case = _case()
    none = IntensityConfig(mode="none")
    item = SliceDataset([case], 64, intensity=none, geometry=STRETCH)[0]
    assert item["pad"] == PadInfo(24, 40, 64, 64, 64)
    assert torch.allclose(item["image"], torch.full((3, 64, 64), 0.5))  # no zero padding anywhere
    assert torch.equal(item["label"], resize_pad_label(torch.from_numpy(case.label[0]).long(), 64, STRETCH))
    longest = SliceDataset([case], 64, intensity=none)[0]
    assert longest["pad"] == PadInfo(24, 40, 38, 64, 64) and longest["image"][:, 38:].abs().sum() == 0
    assert item["key"] != longest["key"]  # the embedding cache keys by content: different pixels, different entries


def test_reassemble_follows_the_geometry():
    case = _case()
    items = volume_slices(case, 0, 64, IntensityConfig(mode="none"), STRETCH)
    probs = [torch.nn.functional.one_hot(items[i]["label"], 2).permute(2, 0, 1).float() for i in range(len(items))]
    assert np.array_equal(reassemble(probs, 0, case, geometry=STRETCH), case.label)
    assert not np.array_equal(reassemble(probs, 0, case), case.label)  # read back the SAM way: misplaced


def test_predictor_with_stretch_predicts_the_case_shape():
    method = make_method("decoder", build_backbone("tiny"))
    predictor = Predictor(method, IntensityConfig(), geometry=STRETCH)
    case = Case("c1", np.random.default_rng(0).random((1, 3, 20, 36), dtype=np.float32))
    assert predictor.predict_case(case).shape == (3, 20, 36)
    assert predictor.predict_cases([case])["c1"].shape == (3, 20, 36)


def test_predictor_takes_the_geometry_of_its_config():
    config = load_config("box_prompt_whole", ["backbone.name=tiny", "data.resize=stretch", "data.resize_via=32"])
    assert Predictor.from_config(config, 1, device="cpu").geometry == VIA


def test_fast_paths_and_onnx_keep_the_geometry(tmp_path):
    """``predict --fast`` candidates and an exported ONNX model slice the way the model was trained, and give the
    exact path's prediction."""
    from samadapt.engine import path_choice
    from samadapt.engine.export import OnnxPredictor

    predictor = Predictor(make_method("decoder", build_backbone("tiny")), IntensityConfig(), geometry=STRETCH)
    case = Case("c1", np.random.default_rng(0).random((1, 2, 20, 36), dtype=np.float32))
    (eager, onnx) = [c.make() for c in path_choice.candidates(predictor, [1], ["eager", "onnx"], tmp_path)[1:]]
    assert eager.geometry == STRETCH
    assert isinstance(onnx, OnnxPredictor) and onnx.geometry == STRETCH
    assert OnnxPredictor(tmp_path / "model.onnx").geometry == STRETCH  # read back from the file's metadata
    assert np.array_equal(onnx.predict_case(case), predictor.predict_case(case))
