"""Fast inference options: conv+BN fusion, bf16 within its tolerance of the exact path, auto by CPU, batching.

The fp32 options of every registered method, and one encoder pass per batch: tests/methods/test_contract.py."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from samadapt.backbones import build_backbone
from samadapt.data.preprocessing import IntensityConfig
from samadapt.engine.fast import (BF16_TOLERANCE, EXACT, FP32_TOLERANCE, FastOptions, apply_fast_options,
                                  bf16_native, fuse_conv_bn)
from samadapt.engine.predict import Predictor
from samadapt.errors import ConfigError
from samadapt.methods import METHODS, build_method
from support import image_items, make_method, predictor_probabilities
from synthetic import Discs



pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _items(n: int = 3) -> list[dict]:
    return image_items(n, seed=3)


def _method(name: str):
    return make_method(name, build_backbone("tiny")).eval()


def test_fuse_conv_bn_is_exact_and_counts():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                        nn.Sequential(nn.Conv2d(8, 4, 1), nn.BatchNorm2d(4)), nn.BatchNorm2d(4))
    for bn in (m for m in net.modules() if isinstance(m, nn.BatchNorm2d)):  # non-trivial running statistics
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
        bn.weight.data.uniform_(0.5, 1.5)
        bn.bias.data.uniform_(-1, 1)
    x = torch.randn(2, 3, 16, 16)
    net.train()
    with pytest.raises(ConfigError, match="inference"):
        fuse_conv_bn(net)
    net.eval()
    ref = net(x)
    assert fuse_conv_bn(net) == 2  # the trailing BN follows a Sequential, not a Conv2d: left alone
    assert isinstance(net[1], nn.Identity) and isinstance(net[3][1], nn.Identity) and isinstance(net[4], nn.BatchNorm2d)
    assert torch.allclose(net(x), ref, atol=1e-5)


def test_bf16_option():
    cpu = torch.device("cpu")
    assert FastOptions(bf16="off").amp(cpu) == "none"
    assert FastOptions(bf16="on").amp(cpu) == "bf16"
    assert FastOptions(bf16="auto").amp(cpu) == ("bf16" if bf16_native(cpu) else "none")
    assert FastOptions(bf16="off").amp(cpu, "bf16") == "bf16"  # a run trained with amp keeps it
    with pytest.raises(ConfigError, match="bf16"):
        FastOptions(bf16="yes")
    method = _method("decoder")
    items = _items()
    exact, _ = predictor_probabilities(copy.deepcopy(method), EXACT, items)
    low, predictor = predictor_probabilities(method, FastOptions(bf16="on"), items)
    assert predictor.amp == "bf16"
    err = (exact - low).abs().max().item()
    assert 0 < err <= BF16_TOLERANCE  # bf16 really ran (not bit-identical) and stayed within tolerance


def _confident_labels(probs: torch.Tensor, margin: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Argmax labels N x H x W of N x C x H x W probabilities, and where the top class leads the next by > margin."""
    top2 = probs.topk(2, dim=1).values
    return probs.argmax(1), (top2[:, 0] - top2[:, 1]) > margin


@pytest.mark.parametrize("name", METHODS.names())
def test_bf16_path_within_its_tolerance(name):
    """bf16 forced on (emulated where the CPU lacks native bf16, so this path runs on every machine): probabilities
    within BF16_TOLERANCE of fp32, hence the same label wherever fp32's top class leads by more than twice that."""
    method = _method(name)
    items = _items()
    exact, _ = predictor_probabilities(copy.deepcopy(method), EXACT, items)
    low, predictor = predictor_probabilities(method, FastOptions(bf16="on"), items)
    assert predictor.amp == "bf16" and predictor.describe()["amp"] == "bf16" and "bf16 autocast" in predictor.summary()
    assert (exact - low).abs().max().item() <= BF16_TOLERANCE
    labels, confident = _confident_labels(exact, 2 * BF16_TOLERANCE)
    assert confident.any()
    assert torch.equal(low.argmax(1)[confident], labels[confident])


def test_bf16_auto_follows_the_cpu(monkeypatch):
    """``auto`` takes bf16 exactly where the device computes it natively; both answers checked on any CPU."""
    from samadapt.engine import fast

    cpu = torch.device("cpu")
    for native in (True, False):
        monkeypatch.setattr(fast, "cpu_bf16_native", lambda native=native: native)
        assert bf16_native(cpu) is native
        assert FastOptions().amp(cpu) == ("bf16" if native else "none")
        predictor = Predictor(_method("decoder"), IntensityConfig(), fast=FastOptions())
        assert predictor.amp == ("bf16" if native else "none")
        assert ("bf16 autocast (auto" in predictor.summary()) is native
        assert ("no native bf16" in predictor.summary()) is not native


@pytest.mark.integration
def test_fast_litemedsam_decoder(real_brain_batch):
    """On LiteMedSAM the 27 TinyViT Conv2d_BN blocks fuse and the fp32 options stay within tolerance."""
    torch.manual_seed(0)
    method = build_method("decoder", build_backbone("litemedsam"), {}, 1).eval()
    items = [{"image": im} for im in real_brain_batch["image"][:2]]
    exact, _ = predictor_probabilities(copy.deepcopy(method), EXACT, items)
    fast, predictor = predictor_probabilities(method, FastOptions(bf16="off"), items)
    assert predictor.fast_report["fused_conv_bn"] == 27
    assert (exact - fast).abs().max().item() <= FP32_TOLERANCE
    assert apply_fast_options(method, FastOptions(bf16="off"))["fused_conv_bn"] == 0  # nothing left to fuse


def test_pictures_share_batches(tmp_path):
    """2D cases (one slice each) are batched together; results equal one-at-a-time prediction."""
    import numpy as np
    from PIL import Image

    from samadapt.data.cases import Case

    cases = [Case(f"c{i}", d["image"][:1, None].numpy() * 255, is_2d=True, file_ending=".png")
             for i, d in enumerate(Discs(7, size=64, seed=4))]
    cases[3] = Case("odd", np.random.default_rng(0).random((1, 1, 50, 70), dtype=np.float32), is_2d=True,
                    file_ending=".png")  # another size in the same batch
    method = _method("decoder")
    one = Predictor(method, IntensityConfig(), batch_size=1).predict_cases(cases)
    sizes = []
    original = method.predict
    method.predict = lambda batch: (sizes.append(batch["image"].shape[0]), original(batch))[1]
    batched = Predictor(method, IntensityConfig(), batch_size=3).predict_cases(iter(cases), tmp_path, total=7)
    assert sizes == [3, 3, 1]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(f"{c.id}.png" for c in cases)
    assert batched["odd"] == tmp_path / "odd.png"
    for c in cases:
        assert np.array_equal(np.asarray(Image.open(batched[c.id])) > 0, one[c.id][0] > 0)
