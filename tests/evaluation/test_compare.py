"""samadapt.evaluation.compare pieces that the CLI test does not reach: model specs, summaries, prompt plots."""

import math

import numpy as np
import pytest

from samadapt.evaluation.compare import ModelSpec, plot_prompts, summarize_rows
from samadapt.data.cases import Case
from samadapt.data.preprocessing import IntensityConfig
from samadapt.engine.predict import Predictor
from samadapt.errors import ConfigError, InputError
from samadapt.methods import build_method
from support import SMALL


def test_model_spec_parsing():
    spec = ModelSpec.parse("desam-box=desam_cpu method.options.mode=box train.lr=1e-4")
    assert (spec.label, spec.config, spec.overrides, spec.reuses) == \
        ("desam-box", "desam_cpu", ["method.options.mode=box", "train.lr=1e-4"], None)
    assert ModelSpec.parse("s1=@hsam method.options.inference_stage=1").reuses == "hsam"
    for bad in ("decoder_cpu", "=decoder_cpu", "x="):
        with pytest.raises(ConfigError):
            ModelSpec.parse(bad)


def test_summary_means_over_cases_and_seeds_without_nans():
    rows = [{"model": "a", "class": 1, "dice": d, "iou": 0.5, "hd95": h, "hd95_vox": h / 2, "nsd": 1.0, "assd": 1.0,
             "train_s": 2.0, "predict_s_per_slice": 0.1} for d, h in ((0.8, 2.0), (0.6, math.nan), (0.7, 4.0))]
    (summary,) = summarize_rows(rows)
    assert summary["n"] == 3 and summary["dice"] == pytest.approx(0.7)
    assert summary["dice_std"] == pytest.approx(np.std([0.8, 0.6, 0.7]))
    assert summary["hd95"] == pytest.approx(3.0)  # the NaN (empty prediction) is left out, not counted as 0
    assert summary["hd95_vox"] == pytest.approx(1.5)


def test_prompt_plot_for_methods_that_choose_points(tiny_backbone, tmp_path):
    rng = np.random.default_rng(0)
    label = np.zeros((3, 40, 48), np.uint8)
    label[:, 10:30, 12:36] = 1
    case = Case("c", (rng.random((1, 3, 40, 48)) + label).astype(np.float32), label)
    promise = Predictor(build_method("promise", tiny_backbone, SMALL["promise"]), IntensityConfig())
    path = plot_prompts(promise, case, [0, 2], tmp_path / "points.png")
    assert path.stat().st_size > 0 and promise.batch_size == 8
    assert promise.method.last_points.shape[0] == 2  # one batch held both picked slices
    decoder = Predictor(build_method("decoder", tiny_backbone, {}), IntensityConfig())
    assert plot_prompts(decoder, case, [0], tmp_path / "none.png") is None


def test_an_interrupted_model_resumes_instead_of_being_refused(tmp_path, monkeypatch):
    """A run folder holding a committed epoch (state.pt) but no finished training is resumed by the next compare."""
    import json

    from samadapt.evaluation import compare as compare_mod
    from synthetic import write_disc_pictures

    (tmp_path / "discs").mkdir()
    disc_folder = write_disc_pictures(tmp_path / "discs", 12, (80, 96), 0, "case{:02d}", (25, 55, 25, 70), (8, 18))

    models = [ModelSpec.parse("dec=decoder_tiny")]
    common = ["data.cache=off", "data.empty_ratio=null"]
    compare_mod.compare(disc_folder, models, tmp_path, epochs=2, common=common, overlays=False)
    run = tmp_path / "runs" / "dec" / "seed0"
    manifest = json.loads((run / "manifest.json").read_text())
    del manifest["training"]  # as if killed after its last epoch's commit, before the run was marked finished
    (run / "manifest.json").write_text(json.dumps(manifest))
    resumed = []
    real_train = compare_mod.run_train
    monkeypatch.setattr(compare_mod, "run_train", lambda cfg, resume=False: resumed.append(resume) or
                        real_train(cfg, resume=resume))
    rows = compare_mod.compare(disc_folder, models, tmp_path, epochs=2, common=common, overlays=False)
    assert resumed == [True] and rows and all(r["epochs"] == 2 for r in rows)


def test_targets_are_scored_with_the_unchanged_models(tmp_path):
    """Every target's test cases are scored by the models trained on the source, one summary row per target."""
    from samadapt.evaluation import compare as compare_mod
    from synthetic import write_disc_pictures

    for name, seed in (("source", 0), ("shifted", 1)):
        (tmp_path / name).mkdir()
        write_disc_pictures(tmp_path / name, 10, (64, 64), seed, "case{:02d}", (20, 44, 20, 44), (8, 14))
    models = [ModelSpec.parse("dec=decoder_tiny")]
    common = ["data.cache=off", "data.empty_ratio=null"]
    rows = compare_mod.compare(tmp_path / "source", models, tmp_path / "out", epochs=1, common=common,
                               overlays=False, targets=[("shift", tmp_path / "shifted")])
    sets = {r["test_set"] for r in rows}
    assert sets == {"source", "shift"}
    assert {r["test_set"] for r in summarize_rows(rows)} == sets
    assert len([r for r in rows if r["test_set"] == "shift"]) > 0
    report = (tmp_path / "out" / "report" / "summary.md").read_text()
    assert "| dec | shift | 1 |" in report
    (tmp_path / "two").mkdir()
    (tmp_path / "two" / "images").mkdir()
    with pytest.raises(InputError, match="two/images: no pictures"):  # a broken target fails before any training
        compare_mod.compare(tmp_path / "source", models, tmp_path / "out", epochs=1, common=common,
                            overlays=False, targets=[("bad", tmp_path / "two")])


def test_scores_are_stored_and_subsets_combine_without_predicting_again(tmp_path, monkeypatch):
    """Two comparisons of disjoint model subsets into one folder, then one over both: the last trains nothing and
    predicts nothing, and gives the same rows; a model whose weights change is scored again."""
    from samadapt.evaluation import compare as compare_mod
    from synthetic import write_disc_pictures

    (tmp_path / "discs").mkdir()
    folder = write_disc_pictures(tmp_path / "discs", 10, (64, 64), 0, "case{:02d}", (20, 44, 20, 44), (8, 14))
    common = ["data.cache=off", "data.empty_ratio=null"]
    dec, box = ModelSpec.parse("dec=decoder_tiny"), ModelSpec.parse("box=box_prompt_whole backbone.name=tiny")
    first = compare_mod.compare(folder, [dec], tmp_path, epochs=1, common=common, overlays=False)
    second = compare_mod.compare(folder, [box], tmp_path, epochs=1, common=common, overlays=False)
    calls = []
    real = compare_mod._evaluate
    monkeypatch.setattr(compare_mod, "_evaluate", lambda *a: calls.append(a) or real(*a))
    from samadapt.engine.run import train as real_train
    monkeypatch.setattr(compare_mod, "run_train", lambda cfg, resume=False: real_train(cfg, resume=resume)
                        if cfg.method.name == "box-prompt" else pytest.fail("a finished run was trained again"))
    both = compare_mod.compare(folder, [dec, box], tmp_path, epochs=1, common=common, overlays=True)
    assert calls == []
    key = lambda r: (r["model"], r["case"], r["class"])  # noqa: E731
    assert sorted(map(key, both)) == sorted(map(key, first + second))
    by_key = {key(r): r["dice"] for r in first + second}
    assert all(by_key[key(r)] == r["dice"] for r in both)
    assert (tmp_path / "report" / "overlays.png").is_file()  # overlays drawn from stored predictions
    # other weights (as after retraining into the same run folder) are scored again
    import shutil
    shutil.rmtree(tmp_path / "runs" / "dec")
    monkeypatch.setattr(compare_mod, "run_train", real_train)
    compare_mod.compare(folder, [dec], tmp_path, epochs=1, common=common + ["train.lr=0.05"], overlays=False)
    assert len(calls) == len({(r["case"]) for r in first})  # every test case predicted again, once
