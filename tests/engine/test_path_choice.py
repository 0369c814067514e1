"""Automatic choice of the prediction path (samadapt.engine.path_choice): never a path outside its tolerance, the
fastest one inside it (on a fake clock: no timing assertions), pinning, and the CLI's report."""

from __future__ import annotations

import json
import random

import pytest
import torch
from typer.testing import CliRunner

from samadapt.backbones import build_backbone
from samadapt.cli import app
from samadapt.data.preprocessing import IntensityConfig
from samadapt.engine import path_choice
from samadapt.engine.export import OnnxPredictor
from samadapt.engine.path_choice import TOLERANCES, Candidate, candidates, choose, pin
from samadapt.engine.predict import Predictor
from samadapt.engine.split_export import SplitPredictor
from samadapt.errors import ConfigError
from samadapt.overlap import foreground_dice
from support import image_items, make_method
from synthetic import write_disc_pictures

pytestmark = pytest.mark.usefixtures("one_torch_thread")


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class FakePredictor:
    """Returns ``reference + offset`` (or raises), advancing the fake clock by ``cost`` per call."""

    def __init__(self, clock: FakeClock, reference: torch.Tensor, cost: float, offset: torch.Tensor | None = None):
        self.clock, self.reference, self.cost, self.offset = clock, reference, cost, offset

    def predict_probabilities(self, items):
        self.clock.now += self.cost
        probs = self.reference if self.offset is None else (self.reference + self.offset)
        return list(probs)


def _reference(n: int = 2) -> torch.Tensor:
    p = torch.rand(n, 1, 16, 16, generator=torch.Generator().manual_seed(0)) * 0.6 + 0.2
    return torch.cat([1 - p, p], dim=1)


def _flip(reference: torch.Tensor, share: float) -> torch.Tensor:
    """An offset that swaps the two classes on ``share`` of the pixels (a lossy path's class errors)."""
    offset = torch.zeros_like(reference)
    mask = torch.rand(reference[:, 0].shape, generator=torch.Generator().manual_seed(1)) < share
    offset[:, 0] = torch.where(mask, reference[:, 1] - reference[:, 0], 0.0)
    offset[:, 1] = -offset[:, 0]
    return offset


def test_fastest_inaccurate_or_failing_paths_are_never_chosen(monkeypatch):
    clock = FakeClock()
    monkeypatch.setattr(path_choice.time, "perf_counter", clock)
    ref = _reference()

    def broken():
        raise ConfigError("export refused")

    fakes = [Candidate("exact", 1, lambda: FakePredictor(clock, ref, 1.0)),
             Candidate("eager", 1, lambda: FakePredictor(clock, ref, 0.5, torch.full_like(ref, 5e-5))),
             Candidate("onnx", 1, lambda: FakePredictor(clock, ref, 0.2, torch.full_like(ref, 1e-2))),  # > 1e-4
             Candidate("bf16", 1, lambda: FakePredictor(clock, ref, 0.1, _flip(ref, 0.05))),  # 95 % agreement
             Candidate("int8", 1, broken)]
    chosen, report = choose(fakes, [{}] * 2, ref)
    assert report["chosen"] == "eager b1" and chosen.cost == 0.5 and not report["pinned"]
    rows = {r["candidate"]: r for r in report["candidates"]}
    assert not rows["onnx b1"]["within_tolerance"] and not rows["bf16 b1"]["within_tolerance"]
    assert rows["bf16 b1"]["agreement"] < TOLERANCES["bf16"].agreement
    assert "export refused" in rows["int8 b1"]["error"]
    assert rows["eager b1"]["s_per_slice"] == pytest.approx(0.25)  # 0.5 on the fake clock for 2 slices


def test_choice_is_the_fastest_within_tolerance_for_random_candidates(monkeypatch):
    """50 random sets of paths, costs and errors: the choice is always within tolerance and the cheapest such."""
    clock = FakeClock()
    monkeypatch.setattr(path_choice.time, "perf_counter", clock)
    ref = _reference()
    rng = random.Random(0)
    for _ in range(50):
        fakes = [Candidate("exact", 1, lambda: FakePredictor(clock, ref, 1.0))]
        for path in rng.sample(["eager", "bf16", "onnx", "int8"], 3):
            cost = rng.uniform(0.01, 2.0)
            offset = rng.choice([None, torch.full_like(ref, 1e-3), _flip(ref, rng.choice([1e-4, 0.01, 0.2]))])
            fakes.append(Candidate(path, rng.choice([1, 4]),
                                   lambda cost=cost, offset=offset: FakePredictor(clock, ref, cost, offset)))
        chosen, report = choose(fakes, [{}] * 2, ref)
        rows = report["candidates"]
        ok = [r for r in rows if r["within_tolerance"]]
        picked = next(r for r in rows if r["candidate"] == report["chosen"])
        assert picked["within_tolerance"] and picked["s_per_slice"] == min(r["s_per_slice"] for r in ok)
        path = report["path"]
        assert TOLERANCES[path].holds(picked["max_abs"], picked["agreement"], picked["dice"])


def test_a_lossy_path_that_agrees_on_the_pixels_but_erodes_a_small_foreground_is_refused(monkeypatch):
    """Pixel agreement 0.9995 (4 of 8192 pixels flipped, all inside a 200-pixel object) passes ``AUTO_AGREEMENT``,
    but the object's Dice falls to 0.99: the lossy path is outside tolerance, the exact one chosen."""
    clock = FakeClock()
    monkeypatch.setattr(path_choice.time, "perf_counter", clock)
    p = torch.full((2, 1, 64, 64), 0.1)
    p[:, :, 20:30, 20:30] = 0.9
    ref = torch.cat([1 - p, p], dim=1)
    offset = torch.zeros_like(ref)
    offset[0, 0, 20:22, 20:22], offset[0, 1, 20:22, 20:22] = 0.8, -0.8  # 4 object pixels become background
    fakes = [Candidate("exact", 1, lambda: FakePredictor(clock, ref, 1.0)),
             Candidate("int8", 1, lambda: FakePredictor(clock, ref, 0.1, offset))]
    _, report = choose(fakes, [{}] * 2, ref)
    row = next(r for r in report["candidates"] if r["candidate"] == "int8 b1")
    assert row["agreement"] == pytest.approx(1 - 4 / 8192) and row["agreement"] >= TOLERANCES["int8"].agreement
    assert row["dice"] == pytest.approx(2 * 196 / (196 + 200)) and not row["within_tolerance"]
    assert report["chosen"] == "exact b1"
    empty = torch.zeros(1, 4, 4, dtype=torch.long)
    assert foreground_dice(empty, empty, 3) == 1.0  # no foreground on either side: nothing lost


@pytest.mark.parametrize("name, sizes, paths, labels", [
    ("decoder", [1, 2], ["eager", "onnx", "int8"], ["exact b1", "exact b2", "eager b1", "eager b2", "onnx b1",
                                                    "onnx b2", "int8 b1", "int8 b2"]),
    ("msam", [2], ["onnx"], ["exact b2", "onnx b2"]),
    ("promise", [2], ["onnx"], ["exact b2", "onnx b2"])])
def test_real_candidates_on_the_tiny_backbone(name, sizes, paths, labels, tmp_path):
    """Every path asked is built and measured (ONNX whole graph for decoder and M-SAM's unrolled automatic chain,
    split for promise); the chosen
    predictor's probabilities are within its tolerance of the exact ones on other slices too."""
    exact = Predictor(make_method(name, build_backbone("tiny")), IntensityConfig(), batch_size=2)
    cands = candidates(exact, sizes, paths, tmp_path)
    assert [c.label for c in cands] == labels
    chosen, report = choose(cands, image_items(2, seed=1))
    assert all("error" not in r for r in report["candidates"]), report
    items = image_items(3, seed=4)
    ref = torch.stack(exact.predict_probabilities(items))
    got = torch.stack(chosen.predict_probabilities(items))
    agree = float((got.argmax(1) == ref.argmax(1)).float().mean())
    dice = foreground_dice(got.argmax(1), ref.argmax(1), ref.shape[1])
    assert report["path"] in ("exact", "eager", "onnx", "int8")
    if report["path"] != "int8":  # fp32 paths hold their bound on any slices; int8's agreement is per batch
        assert TOLERANCES[report["path"]].holds(float((got - ref).abs().max()), agree, dice)


def test_pinning(tmp_path):
    exact = Predictor(make_method("promise", build_backbone("tiny")), IntensityConfig(), batch_size=4)
    predictor, report = pin(exact, "int8", 3, tmp_path)
    assert isinstance(predictor, SplitPredictor) and predictor.batch_size == 3
    assert report == {"chosen": "int8 b3", "path": "int8", "batch_size": 3, "pinned": True, "candidates": []}
    decoder = Predictor(make_method("decoder", build_backbone("tiny")), IntensityConfig())
    assert isinstance(pin(decoder, "onnx", 2, tmp_path / "d")[0], OnnxPredictor)
    predictor, _ = pin(decoder, "bf16", 2)
    assert predictor.amp == "bf16" and predictor.batch_size == 2
    with pytest.raises(ConfigError, match="--path 'fast'"):
        pin(decoder, "fast", 1)
    two_class = Predictor(make_method("desam", build_backbone("tiny"), num_classes=2), IntensityConfig())
    with pytest.raises(ConfigError, match="--path onnx: method 'desam' cannot be exported"):
        pin(two_class, "onnx", 1)


def test_cli_predict_fast_chooses_and_reports(tmp_path, monkeypatch):
    monkeypatch.setenv("SAMADAPT_HOME", str(tmp_path / "home"))
    folder = write_disc_pictures(tmp_path, 3, (40, 50), 0, "p{}", (15, 25, 15, 35), (5, 8))
    model = ["--config", "box_prompt_whole", "--set", "backbone.name=tiny"]  # zero-shot: no training needed
    common = ["predict", str(folder / "images"), *model, "--device", "cpu", "--fast", "--batch-size", "2"]
    result = CliRunner().invoke(app, [*common, "--out", str(tmp_path / "auto")])
    assert result.exit_code == 0, result.output
    assert "fastest within tolerance on the first batch" in result.output
    choice = json.loads((tmp_path / "auto" / "prediction.json").read_text())["path_choice"]
    assert not choice["pinned"] and {r["candidate"] for r in choice["candidates"]} >= {"exact b1", "eager b2"}
    picked = next(r for r in choice["candidates"] if r["candidate"] == choice["chosen"])
    assert picked["within_tolerance"]
    result = CliRunner().invoke(app, [*common, "--path", "onnx", "--out", str(tmp_path / "onnx")])
    assert result.exit_code == 0, result.output
    manifest = json.loads((tmp_path / "onnx" / "prediction.json").read_text())
    assert manifest["path_choice"]["chosen"] == "onnx b2" and manifest["prediction"]["runtime"] == "onnxruntime"
    assert "exported once, reused by later runs" in result.output
    # a second start of the same model reuses its checked graph; another model gets its own
    from samadapt.engine import export

    def refuse(*args, **kwargs):
        raise RuntimeError("exported again")

    monkeypatch.setattr(export, "export_predictor", refuse)
    result = CliRunner().invoke(app, [*common, "--path", "onnx", "--out", str(tmp_path / "onnx2")])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "onnx2" / "prediction.json").is_file()
    other = CliRunner().invoke(app, [*common, "--set", "train.lr=0.5", "--path", "onnx",
                                     "--out", str(tmp_path / "onnx3")])
    assert other.exit_code != 0 and "exported again" in str(other.exception) + other.output, other.output
    assert len(list((tmp_path / "home" / "exports").iterdir())) == 1  # the refused export wrote nothing
    result = CliRunner().invoke(app, ["predict", str(folder / "images"), *model, "--path", "eager",
                                      "--out", str(tmp_path / "x")])
    assert result.exit_code != 0 and "add --fast" in result.output


def test_openvino_is_a_candidate_only_with_native_bf16_and_the_package(monkeypatch, tmp_path):
    """OpenVINO's bf16 hint falls back to fp32 without native bf16 (where it lost to ONNX Runtime), so ``auto``
    offers it only where bf16 is native and the optional package is installed; pinning it without the package is a
    clear error."""
    exact = Predictor(make_method("decoder", build_backbone("tiny")), IntensityConfig())
    for native, installed in ((True, True), (True, False), (False, True)):
        monkeypatch.setattr(path_choice, "bf16_native", lambda device, native=native: native)
        monkeypatch.setattr(path_choice, "openvino_available", lambda installed=installed: installed)
        paths = {c.path for c in candidates(exact, [1], None, tmp_path)}
        assert ("openvino" in paths) == (native and installed) and "onnx" in paths
    monkeypatch.setattr(path_choice, "openvino_available", lambda: False)
    with pytest.raises(ConfigError, match="needs the openvino package"):
        pin(exact, "openvino", 1, tmp_path)


@pytest.mark.parametrize("name", ["decoder", "promise"])
def test_the_openvino_path_runs_the_checked_graph_within_the_bf16_tolerance(name, tmp_path):
    """Pinned ``openvino`` runs the fp32 ONNX graph (decoder: whole; ProMISe: the split encoder, its PyTorch head
    under bf16 autocast) in OpenVINO bf16 (fp32 where the CPU has no native bf16): probabilities within
    ``BF16_TOLERANCE`` of the exact path on slices of another batch size, and the predictor says what computed
    them."""
    pytest.importorskip("openvino")
    from samadapt.engine.fast import BF16_TOLERANCE

    exact = Predictor(make_method(name, build_backbone("tiny")), IntensityConfig(), batch_size=2)
    predictor, report = pin(exact, "openvino", 2, tmp_path)
    assert report["chosen"] == "openvino b2" and predictor.runtime == "openvino-bf16"
    assert "OpenVINO (bf16)" in predictor.summary() and "openvino-bf16" in predictor.describe()["runtime"]
    assert isinstance(predictor, SplitPredictor) == (name == "promise")
    assert name != "promise" or predictor.amp == "bf16"  # a split method's PyTorch head is on the bf16 path too
    items = image_items(3, seed=4)
    ref = torch.stack(exact.predict_probabilities(items))
    got = torch.stack(predictor.predict_probabilities(items))
    assert got.shape == ref.shape and (got - ref).abs().max().item() <= BF16_TOLERANCE
