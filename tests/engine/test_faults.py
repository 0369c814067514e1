"""Faults a careless user (or a power cut) produces: kill -9 at any instant of training, corrupted checkpoints,
NaN/Inf in images, two writers in one run folder, a finished run trained into again, bad options and outputs.

Each test states the defect it guards against; they run on the tiny backbone (kills in a subprocess, the rest in
this process).
"""

from __future__ import annotations

import csv
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from samadapt.cli import app
from samadapt.config.run_config import load_config
from samadapt.errors import CheckpointError, ConfigError, InputError, TrainingError
from support import write_dicom_series
from synthetic import Discs, write_disc_pictures

ENV = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1", "PYTHONIOENCODING": "utf-8"}
SETS = ["backbone.name=tiny", "method.name=decoder", "train.device=cpu", "data.cache=off", "data.empty_ratio=null",
        "train.batch_size=4", "train.lr=0.001", "train.threads=1", "train.epochs=3"]

# Runs `samadapt train ...` (argv[4:]) and SIGKILLs itself around the NTH rename onto a file named TARGET (or, for
# "*SUFFIX", ending in SUFFIX; "before" or "after" it), or at the NTH validation ("validate"): a real kill -9 at a
# chosen instant, no timing involved.
# With "validate" and WHEN "pause" it instead creates the file $FAULT_MARKER there and waits for $FAULT_MARKER.go.
# With "torch.save" it kills inside the NTH torch.save (state.pt), its temporary file cut to half its size.
DRIVER = r"""
import os, signal, sys, time
target, nth, when = sys.argv[1], int(sys.argv[2]), sys.argv[3]
seen = [0]
def hit():
    seen[0] += 1
    return seen[0] == nth
if target == "validate":
    import samadapt.engine.trainer as trainer
    real_validate = trainer.validate
    def validate(*a, **k):
        if hit() and when == "pause":
            marker = os.environ["FAULT_MARKER"]
            open(marker, "w").close()
            while not os.path.exists(marker + ".go"):
                time.sleep(0.05)
        elif seen[0] == nth:
            os.kill(os.getpid(), signal.SIGKILL)
        return real_validate(*a, **k)
    trainer.validate = validate
elif target == "torch.save":  # inside the save: the temporary file half written when the kill lands
    import torch
    real_save = torch.save
    def save(obj, f, *a, **k):
        real_save(obj, f, *a, **k)
        if hit():
            os.truncate(f, os.path.getsize(f) // 2)
            os.kill(os.getpid(), signal.SIGKILL)
    torch.save = save
else:
    real_replace = os.replace
    def replace(src, dst, *a, **k):
        name = os.path.basename(str(dst))
        mine = (name == target or target.startswith("*") and name.endswith(target[1:])) and hit()
        if mine and when == "before":
            os.kill(os.getpid(), signal.SIGKILL)
        real_replace(src, dst, *a, **k)
        if mine and when == "after":
            os.kill(os.getpid(), signal.SIGKILL)
    os.replace = replace
from samadapt.cli import main
sys.argv = ["samadapt"] + sys.argv[4:]
main()
"""


@pytest.fixture(scope="module")
def discs(tmp_path_factory) -> Path:
    """8 gray 48x48 disc pictures (images/ + masks/): 1 validation case with the default split."""
    return write_disc_pictures(tmp_path_factory.mktemp("fault_discs"), 8, (48, 48), 0, "case{:02d}",
                               (15, 33, 15, 33), (5, 10))


@pytest.fixture
def one_thread():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def _cfg(data: Path, out: Path, *extra: str):
    return load_config(None, SETS + [f"data.path={data}", f"output={out}", *extra])


def _train(data: Path, out: Path, *extra: str, **kwargs):
    from samadapt.engine.run import train

    return train(_cfg(data, out, *extra), **kwargs)


def _rows(run: Path) -> list[dict]:
    with (run / "log.csv").open() as handle:
        return [{k: v for k, v in row.items() if k != "seconds"} for row in csv.DictReader(handle)]


def _leftovers(run: Path) -> list[str]:
    return sorted(str(p.relative_to(run)) for p in run.rglob(".*") if p.name != ".lock")


def _tensorboard_steps(run: Path) -> list[int]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    steps = []
    for events in sorted((run / "tensorboard").glob("events.out.tfevents.*")):
        acc = EventAccumulator(str(events))
        acc.Reload()
        steps += [e.step for e in acc.Scalars("train/loss")] if "train/loss" in acc.Tags()["scalars"] else []
    return sorted(steps)


@pytest.fixture(scope="module")
def straight(discs, tmp_path_factory) -> Path:
    """The reference: 3 epochs without interruption."""
    before = torch.get_num_threads()
    out = tmp_path_factory.mktemp("straight") / "run"
    _train(discs, out)
    torch.set_num_threads(before)
    return out


# Defect 1: a kill during the end-of-epoch save left state.pt one epoch behind last/best/log.csv, so --resume
# re-ran an epoch with mixed state, logged it twice and left a 0-byte .part file.
@pytest.mark.parametrize("target,nth,when", [
    ("validate", 2, "-"),  # in the middle of epoch 2
    ("state.pt", 2, "before"),  # the commit of epoch 2 written but not yet renamed
    ("state.pt", 2, "after"),  # epoch 2 committed, nothing derived from it yet
    ("last.json", 2, "before"),  # last.safetensors of epoch 2 written, its manifest still epoch 1's
])
def test_kill_at_any_instant_resumes_exactly(discs, straight, tmp_path, one_thread, target, nth, when):
    out = tmp_path / "run"
    args = ["train", "--data", str(discs), "--out", str(out)] + [a for s in SETS for a in ("--set", s)]
    proc = subprocess.run([sys.executable, "-c", DRIVER, target, str(nth), when, *args], capture_output=True,
                          text=True, env=ENV, timeout=600)
    assert proc.returncode == -9, proc.stderr[-2000:]
    result = _train(discs, out, resume=True)
    assert [h["epoch"] for h in result.history] == [1, 2, 3]
    assert _rows(out) == _rows(straight)
    for name in ("last.safetensors", "best.safetensors"):
        assert (out / "checkpoints" / name).read_bytes() == (straight / "checkpoints" / name).read_bytes(), name
    assert _tensorboard_steps(out) == [1, 2, 3]
    assert _leftovers(out) == []  # the killed writer's temporary files are gone


# Defect 1, at seeded random instants: around any of the 17 file renames of a 3-epoch run (config, manifest,
# state.pt, last/best checkpoints and manifests, log.csv) or half-way through writing state.pt. The next run (with
# --resume once an epoch is committed, as a user would) ends byte-identical to the uninterrupted run.
RANDOM_KILLS = [("*", n, when) for n, when in zip(random.Random(24).sample(range(1, 18), 3),
                                                  random.Random(25).choices(["before", "after"], k=3))]
RANDOM_KILLS.append(("torch.save", random.Random(24).randint(1, 3), "-"))


@pytest.mark.parametrize("target,nth,when", RANDOM_KILLS, ids=[f"{t}{n}{w}" for t, n, w in RANDOM_KILLS])
def test_kill_at_random_instants_resumes_exactly(discs, straight, tmp_path, one_thread, target, nth, when):
    from samadapt.engine.rundir import RunDir

    out = tmp_path / "run"
    args = ["train", "--data", str(discs), "--out", str(out)] + [a for s in SETS for a in ("--set", s)]
    proc = subprocess.run([sys.executable, "-c", DRIVER, target, str(nth), when, *args], capture_output=True,
                          text=True, env=ENV, timeout=600)
    assert proc.returncode == -9, proc.stderr[-2000:]
    resume = out.is_dir() and RunDir(out).trained_epochs() is not None
    result = _train(discs, out, resume=resume)
    assert [h["epoch"] for h in result.history] == [1, 2, 3]
    assert _rows(out) == _rows(straight)
    for name in ("last.safetensors", "best.safetensors"):
        assert (out / "checkpoints" / name).read_bytes() == (straight / "checkpoints" / name).read_bytes(), name
    assert _tensorboard_steps(out) == [1, 2, 3]
    assert _leftovers(out) == []


# Defect 2: a checkpoint whose payload was corrupted (header intact) loaded silently and predicted empty masks.
def test_corrupted_or_non_finite_checkpoint_is_refused(tmp_path, tiny_backbone):
    from samadapt.engine.checkpoint import load_checkpoint, save_checkpoint
    from samadapt.methods import build_method

    method = build_method("decoder", tiny_backbone, {}, 1)
    path = save_checkpoint(method, tmp_path / "c.safetensors", {"backbone": {"name": "tiny"}})
    load_checkpoint(method, path)
    data = bytearray(path.read_bytes())
    data[-100:-90] = bytes(10)  # inside the last tensor's bytes; the JSON header stays intact
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="corrupted checkpoint"):
        load_checkpoint(method, path)
    with torch.no_grad():
        next(p for _, p in method.trainable_parameters()).view(-1)[0] = float("nan")
    path = save_checkpoint(method, tmp_path / "nan.safetensors", {"backbone": {"name": "tiny"}})
    with pytest.raises(CheckpointError, match=r"non-finite \(NaN/Inf\) weights in 1 tensor"):
        load_checkpoint(method, path)
    other = save_checkpoint(build_method("decoder", tiny_backbone, {}, 1), tmp_path / "o.safetensors", {})
    shutil.copy(other.with_suffix(".json"), path.with_suffix(".json"))  # a manifest of other weights
    with pytest.raises(CheckpointError, match="describes other weights"):
        load_checkpoint(method, path)
    path.with_suffix(".safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"nan\.safetensors: checkpoint file not found"):
        load_checkpoint(method, path)


def _volume_folder(root: Path) -> Path:
    import SimpleITK as sitk

    root.mkdir()
    for name in ("a.nii.gz", "b.mha"):
        arr = np.ones((3, 8, 8), np.float32)
        arr[0, 1, 2], arr[2, 3, 4], arr[1, 5, 5] = np.nan, np.inf, -np.inf
        sitk.WriteImage(sitk.GetImageFromArray(arr), str(root / name))
    return root


# Defect 3: NaN/Inf intensities were never reported: SimpleITK turned them into 0 in NIfTI, `data check` said OK,
# MHA training crashed without naming the case and npz validation was NaN every epoch.
def test_non_finite_images_are_reported_or_replaced_on_request(tmp_path):
    from samadapt.data.check import check_dataset
    from samadapt.data.readers import open_dataset

    folder = _volume_folder(tmp_path / "vols")
    report = check_dataset(folder)
    assert not report["ok"]
    problems = {e["case"]: (Path(e["file"]).name, e["problem"]) for e in report["errors"]}
    assert set(problems) == {"a", "b"}
    for case, (file, problem) in problems.items():
        assert file.startswith(case) and "3 non-finite value(s) (1 NaN, 2 Inf)" in problem
        assert "data.nonfinite=zero" in problem
    replaced = open_dataset(folder, nonfinite="zero").load("a")
    assert np.isfinite(replaced.image).all() and replaced.meta["nonfinite_replaced"] == 3
    assert replaced.image[0, 0, 1, 2] == 0 and replaced.image[0, 0, 0, 0] == 1
    img = np.ones((16, 16), np.float32)
    img[3, 3] = np.nan
    np.savez(tmp_path / "c1.npz", imgs=img, gts=np.zeros((16, 16), np.uint8))
    with pytest.raises(InputError, match=r"c1\.npz: case 'c1': image holds 1 non-finite value\(s\) \(1 NaN"):
        open_dataset(tmp_path / "c1.npz").load("c1")


# Defect 3 (training side): a non-finite loss raised a bare FloatingPointError naming no case.
def test_non_finite_loss_stops_training_naming_the_batch(tmp_path, tiny_backbone):
    from samadapt.config.run_config import TrainConfig
    from samadapt.engine.trainer import Trainer
    from samadapt.methods import build_method

    data = Discs(4)
    data.items[2]["image"] = torch.full_like(data.items[2]["image"], float("nan"))
    method = build_method("decoder", tiny_backbone, {}, 1)
    trainer = Trainer(method, TrainConfig(epochs=1, batch_size=4), tmp_path / "run", {}, torch.device("cpu"))
    with pytest.raises(TrainingError, match=r"non-finite loss nan at epoch 1, batch 1 \(items .*disc-0-2"):
        trainer.fit(data, None)
    assert not (tmp_path / "run" / "state.pt").exists()


# Defects 4 and 5: no lock on a run folder; a finished run was silently overwritten; --resume accepted another
# configuration or dataset and rewrote config.yaml; a failed --resume still wrote config.yaml and manifest.json.
def test_run_folder_is_locked_and_kept_whole(discs, tmp_path, one_thread):
    data = tmp_path / "data"
    shutil.copytree(discs, data)
    out = tmp_path / "run"
    with pytest.raises(InputError, match="no such run folder to resume"):
        _train(data, out, "train.epochs=1", resume=True)
    assert not out.exists()
    _train(data, out, "train.epochs=1")
    written = {name: (out / name).read_bytes() for name in ("config.yaml", "manifest.json", "log.csv")}
    with pytest.raises(InputError, match=r"already holds a trained run \(1 epoch\(s\)\); pass --resume"):
        _train(data, out, "train.epochs=1")
    with pytest.raises(ConfigError, match=r"train\.epochs: 1 -> 2; train\.lr: 0\.001 -> 0\.002.*--allow-changes"):
        _train(data, out, "train.epochs=2", "train.lr=0.002", resume=True)
    picture = data / "images" / "case03.png"  # the same folder with one picture changed
    from PIL import Image

    Image.fromarray(np.zeros((48, 48), np.uint8)).save(picture)
    with pytest.raises(InputError, match="--resume on data that differs.*data content: fingerprint"):
        _train(data, out, "train.epochs=1", resume=True)
    assert {name: (out / name).read_bytes() for name in written} == written  # nothing rewritten
    from samadapt.io_utils import FolderLock

    with FolderLock(out):
        with pytest.raises(InputError, match=r"another samadapt process \(pid \d+\) is writing to this folder"):
            _train(data, out, "train.epochs=1", overwrite=True)
    result = _train(data, out, "train.epochs=2", "train.lr=0.002", resume=True, allow_changes=True)
    assert [h["epoch"] for h in result.history] == [1, 2] and len(_rows(out)) == 2
    _train(data, out, "train.epochs=1", overwrite=True)
    assert [r["epoch"] for r in _rows(out)] == ["1"]


# Defect 4: two `samadapt train` into one --out both exited 0, log.csv interleaved and one reported a checkpoint
# holding the other's model.
def test_second_concurrent_train_into_one_folder_is_refused(discs, tmp_path, one_thread):
    import time

    out, marker = tmp_path / "run", tmp_path / "paused"
    args = ["train", "--data", str(discs), "--out", str(out)] + [a for s in SETS for a in ("--set", s)]
    first = subprocess.Popen([sys.executable, "-c", DRIVER, "validate", "1", "pause", *args], env={
        **ENV, "FAULT_MARKER": str(marker)}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        while not marker.exists() and first.poll() is None:  # the first run is inside its first epoch
            time.sleep(0.1)
        assert first.poll() is None, first.communicate()[1][-2000:]
        code, output = _cli(*args)
        assert code == 2 and f"another samadapt process (pid {first.pid}) is writing to this folder" in output
    finally:
        Path(f"{marker}.go").touch()
        _, err = first.communicate(timeout=600)
    assert first.returncode == 0, err[-2000:]
    assert [r["epoch"] for r in _rows(out)] == ["1", "2", "3"]


def _cli(*args: str):
    result = CliRunner().invoke(app, list(args))
    return result.exit_code, result.output


# Defects 6 and 7: tracebacks (exit 1) for a bad --out and out-of-range options, --epochs 0 reporting a missing
# checkpoint, "best val Dice -inf" without a validation case; several left config/manifest behind. Point 9: training
# on a DICOM folder said only "no cases to split"; `predict --run R --set ...` ignored --set without a word.
def test_bad_options_and_outputs_are_one_line_errors(discs, tmp_path, one_thread):
    not_a_folder = tmp_path / "file.txt"
    not_a_folder.write_text("x")
    train = ["train", "--data", str(discs)] + [a for s in SETS if "epochs" not in s for a in ("--set", s)]
    cases = [
        (train + ["--out", str(not_a_folder)], "exists and is not a folder"),
        (train + ["--out", str(not_a_folder / "run")], "is not a folder"),
        (train + ["--out", str(tmp_path / "r1"), "--set", "train.lr=-1"], "train.lr=-1.0 is out of range"),
        (train + ["--out", str(tmp_path / "r2"), "--set", "train.batch_size=0"], "train.batch_size=0 is out of range"),
        (train + ["--out", str(tmp_path / "r3"), "--epochs", "0"], "train.epochs=0 is out of range: expected >= 1"),
        (["predict", str(discs / "images"), "--run", str(tmp_path), "--out", str(tmp_path / "p"), "--batch-size",
          "0"], "--batch-size 0: expected >= 1"),
        (["predict", str(discs / "images"), "--run", str(tmp_path), "--out", str(tmp_path / "p"), "--set",
          "train.lr=1"], "a trained model (--run, --checkpoint, --onnx) keeps the settings"),
        (["predict", str(discs / "images"), "--run", str(tmp_path), "--out", str(not_a_folder)], "not a folder"),
        (["evaluate", str(discs / "masks"), str(discs / "masks"), "--out", str(not_a_folder)], "not a folder"),
    ]
    (tmp_path / "two").mkdir()
    two = write_disc_pictures(tmp_path / "two", 2, (48, 48), 0, "c{:02d}", (15, 33, 15, 33), (5, 10))
    cases.append((["train", "--data", str(two), "--out", str(tmp_path / "r4")] + train[3:],
                  "no validation case: the split of 2 labelled case(s) leaves none"))
    cases.append((["train", "--data", str(discs / "images"), "--out", str(tmp_path / "r5")] + train[3:],
                  "no labelled case to train on: this folder2d input holds 8 image(s) without labels"))
    write_dicom_series(tmp_path / "series", np.zeros((2, 16, 16), np.int16), "1.2.826.0.1.3680043.2.1125.240")
    cases.append((["train", "--data", str(tmp_path / "series"), "--out", str(tmp_path / "r6")] + train[3:],
                  "no labelled case to train on: this dicom input holds 1 image(s) without labels"))
    for args, message in cases:
        code, output = _cli(*args)
        assert code == 2, (args, output)
        assert message in output and "Traceback" not in output, (args, output)
        assert output.strip().count("\n") == 0, output  # one line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file.txt", "series", "two"]  # nothing written anywhere


# Defect 8: atomically written files were mode 0600 whatever the umask; a killed writer's temp files stayed.
def test_written_files_follow_the_umask_and_stale_parts_are_cleaned(tmp_path, tiny_backbone):
    from samadapt.engine.checkpoint import save_checkpoint
    from samadapt.methods import build_method

    old = os.umask(0o022)
    try:
        path = save_checkpoint(build_method("decoder", tiny_backbone, {}, 1), tmp_path / "c.safetensors", {})
    finally:
        os.umask(old)
    assert path.stat().st_mode & 0o777 == 0o644 and path.with_suffix(".json").stat().st_mode & 0o777 == 0o644
    from samadapt.io_utils import clean_stale_parts

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = tmp_path / "sub" / f".mask.png.{int(dead.stdout)}-0123abcd.part.png"
    live = tmp_path / f".log.csv.{os.getpid()}-89abcdef.part.csv"
    stale.parent.mkdir()
    stale.write_bytes(b"")
    live.write_bytes(b"")
    assert clean_stale_parts(tmp_path) == [stale]
    assert live.exists() and not stale.exists()
    from samadapt.engine.embedding_cache import EmbeddingCache

    cache_dir = EmbeddingCache(tmp_path / "cache", tiny_backbone).dir  # a cache folder is cleaned when opened
    entry = cache_dir / "ab" / f".abcd.safetensors.{int(dead.stdout)}-0123abcd.part.safetensors"
    entry.parent.mkdir(parents=True)
    entry.write_bytes(b"")
    EmbeddingCache(tmp_path / "cache", tiny_backbone)
    assert not entry.exists()


# Defect 8 (predict): a kill -9 during predict left hidden temporary files in the output folder that nothing cleaned.
def test_killed_prediction_leaves_nothing_after_the_next_run(discs, straight, tmp_path):
    out = tmp_path / "pred"
    args = ["predict", str(discs / "images"), "--run", str(straight), "--out", str(out), "--device", "cpu"]
    proc = subprocess.run([sys.executable, "-c", DRIVER, "case03.png", "1", "before", *args], capture_output=True,
                          text=True, env=ENV, timeout=600)
    assert proc.returncode == -9, proc.stderr[-2000:]
    assert [p.name for p in out.glob(".case03.png.*.part.png")]  # the killed writer's temporary mask
    code, output = _cli(*args)
    assert code == 0, output
    masks = [f"case{i:02d}.png" for i in range(8)]
    assert sorted(p.name for p in out.iterdir()) == sorted(masks + ["prediction.json"])
    reference = tmp_path / "reference"  # an uninterrupted prediction gives the same masks
    code, output = _cli(*args[:5], str(reference), *args[6:])
    assert code == 0, output
    assert all((out / name).read_bytes() == (reference / name).read_bytes() for name in masks)


# Point 9: geometry mismatches printed np.float64(...) in their messages.
def test_geometry_messages_print_plain_numbers():
    from samadapt.data._io import Volume, same_geometry

    a = Volume(np.zeros((1, 2, 2, 2)), (1.0, 1.0, 1.0), (0.0, 0.0, 0.0), (1, 0, 0, 0, 1, 0, 0, 0, 1), 3)
    b = Volume(np.zeros((1, 2, 2, 2)), (2.5, 1.0, 1.0), (0.0, 0.0, 0.0), (1, 0, 0, 0, 1, 0, 0, 0, 1), 3)
    assert same_geometry(a, b) == "spacing (2.5, 1.0, 1.0) differs from image spacing (1.0, 1.0, 1.0)"


# Point 9: `data check` rejected a folder mixing gray and RGBA pictures while `train` took it and dropped alpha
# without a word. Now both take gray + RGB pictures (gray read as three equal channels; data check notes it and the
# dropped alpha), and both refuse any other mix of channel counts, naming a file of each count.
def test_channel_mix_is_judged_alike_by_check_and_train(tmp_path):
    from PIL import Image

    from samadapt.data.check import check_dataset
    from samadapt.engine.run import prepare_data

    (tmp_path / "mix").mkdir()
    pictures = write_disc_pictures(tmp_path / "mix", 4, (32, 32), 0, "c{:02d}", (8, 24, 8, 24), (4, 8))
    gray = np.asarray(Image.open(pictures / "images" / "c03.png"))
    Image.fromarray(np.stack([gray] * 3 + [np.full_like(gray, 200)], -1), "RGBA").save(pictures / "images" / "c03.png")
    report = check_dataset(pictures)
    assert report["ok"] and report["channels"] == [1, 3], report["errors"]
    assert any("pictures mix gray and RGB: 3 with 1" in w and "c03.png" in w for w in report["warnings"])
    assert any("1 picture(s) have an alpha channel, which is dropped (e.g. " in w for w in report["warnings"])
    cfg = _cfg(pictures, tmp_path / "run").data
    assert prepare_data(cfg, 32).train.cases  # trains

    volumes = tmp_path / "npz"
    volumes.mkdir()
    mask = np.zeros((2, 16, 16), np.uint8)
    mask[:, 4:12, 4:12] = 1
    for i in range(4):
        image = np.ones((2, 16, 16, 3) if i == 2 else (2, 16, 16), np.float32)
        np.savez(volumes / f"v{i}.npz", imgs=image, gts=mask)
    report = check_dataset(volumes)
    problem = "cases differ in channel count: 3 with 1 (e.g. "
    assert not report["ok"] and any(problem in e["problem"] and "v2.npz" in e["problem"] for e in report["errors"])
    with pytest.raises(InputError, match=r"cases differ in channel count: 3 with 1 .*; 1 with 3 \(e\.g\. .*v2\.npz"):
        prepare_data(_cfg(volumes, tmp_path / "run2", "data.val_fraction=0.25", "data.test_fraction=0").data, 32)


# Points 8 and 9: a kill -9 while the embedding cache was filled left temporary entries behind, and the cache never
# said how many entries it had to recompute. The next run cleans the cache folder, computes only what is missing,
# says so, and trains exactly as an uninterrupted run did; a damaged entry is named in the count and recomputed.
def test_killed_cache_fill_is_cleaned_counted_and_gives_identical_results(discs, tmp_path, capsys, one_thread):
    cached = ["data.cache=on", "train.epochs=2"]  # after SETS, so these win

    def train(out: Path, cache: Path, **kwargs) -> str:
        capsys.readouterr()
        _train(discs, out, *cached, f"data.cache_dir={cache}", **kwargs)
        captured = capsys.readouterr()
        return " ".join((captured.out + captured.err).split())

    reference = tmp_path / "reference"
    assert "6 slice(s), 0 read from disk, 6 computed now (0 of them" in train(reference, tmp_path / "cache0")
    cache, out = tmp_path / "cache", tmp_path / "run"
    args = ["train", "--data", str(discs), "--out", str(out)] + [
        a for s in SETS + cached + [f"data.cache_dir={cache}"] for a in ("--set", s)]
    proc = subprocess.run([sys.executable, "-c", DRIVER, "*.safetensors", "3", "before", *args],
                          capture_output=True, text=True, env=ENV, timeout=600)
    assert proc.returncode == -9, proc.stderr[-2000:]
    assert len(list(cache.rglob(".*.part.safetensors"))) == 1  # the killed writer's temporary entry

    def same_as_reference() -> None:
        assert _rows(out) == _rows(reference)
        for name in ("last.safetensors", "best.safetensors"):
            assert (out / "checkpoints" / name).read_bytes() == (reference / "checkpoints" / name).read_bytes()
        assert not list(cache.rglob(".*")) and _leftovers(out) == []

    assert "6 slice(s), 2 read from disk, 4 computed now (0 of them" in train(out, cache)
    same_as_reference()
    entry = sorted(cache.rglob("*.safetensors"))[4]
    entry.write_bytes(entry.read_bytes()[:-64])  # a damaged entry
    assert "6 slice(s), 5 read from disk, 1 computed now (1 of them replacing unreadable entries)" in train(
        out, cache, overwrite=True)
    same_as_reference()
