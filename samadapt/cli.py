"""The ``samadapt`` command: a thin layer over the Python API (train, predict, train3d, predict3d, evaluate, compare,
cache, data, info, demo, export, benchmark, serve)."""

from __future__ import annotations

import functools
import os
import sys
from pathlib import Path
from typing import Callable, List, Optional

import typer
from rich.console import Console
from typer.core import TyperGroup

from .errors import SamadaptError

app = typer.Typer(add_completion=False, no_args_is_help=True, rich_markup_mode="rich",
                  help="Adapt Segment Anything models to medical image segmentation.")
data_app = typer.Typer(no_args_is_help=True, help="Dataset tools: integrity check, demo dataset builders.")
app.add_typer(data_app, name="data")
console = Console(stderr=True)


def friendly(fn: Callable) -> Callable:
    """Turn samadapt's own errors, and the system's (a denied permission, a full disk), into a red one-line
    message and exit code 2; the traceback only with the environment variable SAMADAPT_DEBUG=1."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (SamadaptError, OSError) as exc:
            if os.environ.get("SAMADAPT_DEBUG", "") not in ("", "0"):
                raise
            console.print(f"[bold red]error:[/] {' '.join(str(exc).split())}", highlight=False, soft_wrap=True)
            raise typer.Exit(2) from None

    return wrapper


def _config(config: Optional[str], overrides: List[str], **shortcuts):
    from .config.run_config import load_config

    sets = [f"{k}={v}" for k, v in shortcuts.items() if v is not None]
    return load_config(config, sets + list(overrides))


@app.command()
@friendly
def train(
    config: Optional[str] = typer.Argument(None, help="YAML run file or bundled preset name (e.g. decoder_cpu)."),
    data: Optional[str] = typer.Option(None, "--data", help="Dataset folder (nnU-Net raw, 2D images/masks, npz)."),
    method: Optional[str] = typer.Option(None, "--method", help="Method name (see `samadapt info`)."),
    backbone: Optional[str] = typer.Option(None, "--backbone", help="Backbone name (see `samadapt info`)."),
    checkpoint: Optional[str] = typer.Option(None, "--checkpoint", help="Backbone weights file (SAM ViT .pth)."),
    out: Optional[str] = typer.Option(None, "--out", help="Run folder (checkpoints, logs, manifest)."),
    epochs: Optional[int] = typer.Option(None, "--epochs", help="Shortcut for --set train.epochs=N."),
    device: Optional[str] = typer.Option(None, "--device", help="auto | cpu | cuda | cuda:N | mps."),
    resume: bool = typer.Option(False, "--resume", help="Continue the run in --out where it stopped."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace the trained run --out holds."),
    allow_changes: bool = typer.Option(False, "--allow-changes", help="With --resume: accept a configuration or "
                                                                      "dataset that differs from the run's."),
    set_: List[str] = typer.Option([], "--set", help="Dotted override, e.g. --set train.lr=3e-4 (repeatable)."),
):
    """Train a method on a dataset; the best checkpoint is chosen on a validation split of the training data."""
    from .engine.run import train as run_train

    cfg = _config(config, set_, **{"data.path": data, "method.name": method, "backbone.name": backbone,
                                   "backbone.checkpoint": checkpoint, "output": out, "train.epochs": epochs,
                                   "train.device": device})
    result = run_train(cfg, resume=resume, overwrite=overwrite, allow_changes=allow_changes)
    if result is None:
        console.print(f"method {cfg.method.name!r} has nothing to train; use `samadapt predict` directly")
    else:
        best = "n/a (no validation split: last epoch kept)" if result.best_metric != result.best_metric \
            else f"{result.best_metric:.4f}"
        console.print(f"best val Dice {best}; checkpoint: {result.best_checkpoint}")


@app.command()
@friendly
def predict(
    inputs: str = typer.Argument(..., help="Image/volume file, DICOM series folder, 2D folder or nnU-Net dataset."),
    out: str = typer.Option(..., "--out", help="Folder for the predicted masks (same size/geometry as inputs)."),
    run: Optional[str] = typer.Option(None, "--run", help="A run folder from `samadapt train` (uses best)."),
    checkpoint: Optional[str] = typer.Option(None, "--checkpoint", help="A .safetensors checkpoint."),
    config: Optional[str] = typer.Option(None, "--config", help="Run file for zero-shot methods (box-prompt)."),
    set_: List[str] = typer.Option([], "--set", help="Dotted override for --config."),
    device: str = typer.Option("auto", "--device"),
    batch_size: int = typer.Option(8, "--batch-size", help="Slices per forward pass."),
    fast: bool = typer.Option(False, "--fast", help="Fast inference: conv+BN fusion, channels-last, bf16 where "
                                                    "native (outputs within the tolerances of samadapt.engine.fast)."),
    bf16: Optional[str] = typer.Option(None, "--bf16", help="With --fast: auto (bf16 autocast where the device "
                                                            "computes it natively) | on | off (fp32). Default auto."),
    path: Optional[str] = typer.Option(None, "--path", help="With --fast: auto (time the paths that apply on the "
                                                            "first batch at batch 1 and --batch-size, keep the "
                                                            "fastest within tolerance; default) | eager | bf16 | "
                                                            "onnx | int8 | openvino (the ONNX graph in OpenVINO "
                                                            "bf16; needs samadapt[openvino]) (pinned)."),
    onnx: Optional[str] = typer.Option(None, "--onnx", help="A model from `samadapt export`, run with ONNX Runtime "
                                                            "(CPU) instead of --run/--checkpoint/--config."),
    clicks: int = typer.Option(0, "--clicks", help="Interactive methods (msam): predict after N corrective clicks "
                                                   "per slice simulated from each case's label (cases need labels)."),
):
    """Write one mask per input case, aligned with it (NIfTI for volumes, PNG for 2D pictures), and
    OUT/prediction.json: what computed them (model, device, fast options, bf16 or fp32, the CPU's capabilities)."""
    from .data.readers import open_dataset
    from .engine.fast import FastOptions
    from .engine.predict import Predictor, write_prediction_manifest

    if bf16 is not None and not fast:
        raise typer.BadParameter("--bf16 chooses the precision of --fast; add --fast (the plain path is fp32)")
    if path is not None and (not fast or bf16 is not None or clicks):
        raise typer.BadParameter("--path chooses the path of --fast; add --fast, leave out --bf16 (--path bf16) "
                                 "and --clicks (clicks run the PyTorch path)")
    choosing = fast and bf16 is None and not clicks  # samadapt.engine.path_choice picks the path from the exact one
    options = FastOptions(bf16=bf16 or "auto") if fast and not choosing else None
    from .errors import ConfigError
    from .io_utils import check_output_dir, clean_stale_parts

    if batch_size < 1:
        raise ConfigError(f"--batch-size {batch_size}: expected >= 1")
    if set_ and (run or checkpoint or onnx):
        raise ConfigError("--set configures a model built from --config or defaults; a trained model (--run, "
                          "--checkpoint, --onnx) keeps the settings it was trained with")
    check_output_dir(out)
    clean_stale_parts(out)  # temporary files of a killed earlier prediction into this folder
    predictor = None
    if onnx:
        if run or checkpoint or config or fast:
            raise typer.BadParameter("--onnx runs an exported model; it cannot be combined with --run, --checkpoint, "
                                     "--config or --fast")
        from .engine.export import OnnxPredictor

        predictor = OnnxPredictor(onnx, batch_size=batch_size)
    if run:
        from .engine.rundir import resolve_checkpoint

        checkpoint = str(resolve_checkpoint(run))
    if checkpoint:  # load the model first: a bad checkpoint fails before any data is read
        predictor = Predictor.from_checkpoint(checkpoint, device=device, batch_size=batch_size, fast=options)
    source = open_dataset(inputs, modality=predictor.modality if predictor else None)
    ids = source.test_case_ids or source.case_ids
    if predictor is None:
        cfg = _config(config, set_, **{"train.device": device})
        predictor = Predictor.from_config(cfg, max(source.num_classes, 1), device=device, batch_size=batch_size,
                                          fast=options)
    if clicks:
        if onnx:
            raise ConfigError("--clicks runs the refinement loop in PyTorch; use --run or --checkpoint, not --onnx")
        predictor.use_clicks(clicks)
    choice = None
    if choosing:
        from .engine import path_choice

        exports = path_choice.export_folder(path_choice.model_key(checkpoint) if checkpoint else
                                            path_choice.model_key(config=cfg, num_classes=max(source.num_classes, 1)))
        predictor, choice = path_choice.select(predictor, path or "auto", (source.load(i) for i in ids), batch_size,
                                               exports)
        console.print(path_choice.summary(choice), highlight=False)
        if any(exports.glob("*.onnx")):
            console.print(f"ONNX graphs of this model: {exports} (exported once, reused by later runs)",
                          highlight=False)
    console.print(predictor.summary(), highlight=False)
    written = predictor.predict_cases((source.load(i) for i in ids), out, total=len(ids))
    write_prediction_manifest(out, predictor, inputs=inputs, model=onnx or checkpoint or config, cases=sorted(written),
                              path_choice=choice)
    console.print(f"wrote {len(written)} mask(s) to {out}")


@app.command("train3d")
@friendly
def train3d(
    data: str = typer.Argument(..., help="3D dataset: nnU-Net raw folder (imagesTr/, labelsTr/), one channel."),
    out: str = typer.Option(..., "--out", help="Run folder (checkpoints, log.csv, manifest)."),
    checkpoint: Optional[str] = typer.Option(None, "--checkpoint", help="SAM-Med3D weights (sam_med3d_turbo.pth or "
                                                                        "sam_med3d.pth); required unless --tiny."),
    tiny: bool = typer.Option(False, "--tiny", help="A small random SAM-Med3D (32^3 cubes; tests and demos only)."),
    steps: Optional[int] = typer.Option(None, "--steps", help="Shortcut for --set train.steps=N."),
    device: Optional[str] = typer.Option(None, "--device", help="auto | cpu | cuda | cuda:N | mps."),
    resume: bool = typer.Option(False, "--resume", help="Continue the run in --out where it stopped."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace the trained run --out holds."),
    allow_changes: bool = typer.Option(False, "--allow-changes", help="With --resume: accept a configuration or "
                                                                      "dataset that differs from the run's."),
    set_: List[str] = typer.Option([], "--set", help="Dotted override, e.g. --set train.iterations=5 (sections "
                                                     "backbone, model, data, train; see samadapt.engine.volume_run)."),
):
    """3D M-SAM (SAM-Med3D backbone): train on whole volumes, choosing the best checkpoint by the sliding-window
    Dice of a validation split."""
    from .engine.volume_run import train3d as run_train3d, volume_config

    shortcuts = {"data.path": data, "output": out, "backbone.checkpoint": checkpoint, "train.steps": steps,
                 "train.device": device, "backbone.size": "tiny" if tiny else None}
    cfg = volume_config([f"{k}={v}" for k, v in shortcuts.items() if v is not None] + list(set_))
    result = run_train3d(cfg, resume=resume, overwrite=overwrite, allow_changes=allow_changes)
    best = "n/a (no validation split: last round kept)" if result.best_metric != result.best_metric \
        else f"{result.best_metric:.4f}"
    console.print(f"best val Dice {best}; checkpoint: {result.best_checkpoint}")


@app.command("predict3d")
@friendly
def predict3d(
    inputs: str = typer.Argument(..., help="3D volume file or nnU-Net dataset (imagesTs/, else imagesTr/)."),
    run: str = typer.Option(..., "--run", help="A run folder from `samadapt train3d` (uses best)."),
    out: str = typer.Option(..., "--out", help="Folder for the predicted masks (same size/geometry as inputs)."),
    clicks: int = typer.Option(0, "--clicks", help="Predict after N simulated clicks per window from each case's "
                                                   "label (labelled cases: imagesTr + labelsTr)."),
    device: str = typer.Option("auto", "--device"),
):
    """Whole volumes through a trained 3D M-SAM (sliding window), written with their geometry, and
    OUT/prediction.json."""
    from .engine.volume_run import predict3d as run_predict3d

    written = run_predict3d(run, inputs, out, clicks=clicks, device=device)
    console.print(f"wrote {len(written)} mask(s) to {out}")


class EvaluateGroup(TyperGroup):
    """``samadapt evaluate``: one subcommand per evaluation protocol. A first word that names none of them means
    ``folders``, so the old form ``samadapt evaluate PRED GT --out X`` keeps working (an alias for one release)."""

    def parse_args(self, ctx, args: List[str]) -> List[str]:
        if args and args[0] not in self.commands and args[0] not in ctx.help_option_names:
            args = ["folders", *args]
        return super().parse_args(ctx, args)


evaluate_app = typer.Typer(cls=EvaluateGroup, no_args_is_help=True, rich_markup_mode="rich",
                           help="Evaluation protocols: folders (score predicted masks), dg (domain generalisation), "
                                "refinement (M-SAM curves), prompting (ProMISe), light-decoder (HeterSAM). "
                                "`samadapt evaluate PRED GT --out X` is `samadapt evaluate folders ...` (old form, "
                                "kept for one release).")
app.add_typer(evaluate_app, name="evaluate")


def _named(items: List[str], option: str, what: str) -> dict[str, str]:
    """``NAME=VALUE`` items of a repeatable option -> {NAME: VALUE} (a one-line error naming the bad item)."""
    from .errors import ConfigError

    pairs = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name or not value:
            raise ConfigError(f"{option} {item!r}: expected NAME={what}")
        pairs[name] = value
    return pairs


def _threads(threads: Optional[int]) -> None:
    if threads:
        import torch

        torch.set_num_threads(threads)


@evaluate_app.command("folders")
@friendly
def evaluate_folders_cmd(
    pred: str = typer.Argument(..., help="Folder of predicted masks."),
    gt: str = typer.Argument(..., help="Folder of ground-truth masks (same file names)."),
    out: str = typer.Option(..., "--out", help="Folder for per_case.csv and summary.json."),
    nsd_tolerance: float = typer.Option(1.0, "--nsd-tolerance", help="NSD tolerance in mm."),
    metric: List[str] = typer.Option([], "--metric", help="Metric to report (repeatable; default dice iou hd95 "
                                     "hd95_vox nsd assd). hd95_medpy(_vox): MedPy's HD95, as SAMed/H-SAM report it."),
    grid: Optional[int] = typer.Option(None, "--grid", help="Score 2D pictures on a GRID x GRID copy: prediction "
                                       "nearest, ground truth bilinear then > 0 (ProMISe's release: 256)."),
):
    """Dice, IoU, HD95 (mm and voxels), NSD and ASSD (mm where spacing is known) per case and class."""
    from .evaluation.folders import EVALUATION_METRICS, evaluate_folders, print_summary
    from .io_utils import check_output_dir

    check_output_dir(out)
    summary = evaluate_folders(pred, gt, out, nsd_tolerance_mm=nsd_tolerance, metrics=metric or EVALUATION_METRICS,
                               grid=grid)
    print_summary(summary)


@friendly
def evaluate_dg(
    run: str = typer.Argument(..., help="A `samadapt train` run folder (uses checkpoints/best) or a checkpoint."),
    targets: List[str] = typer.Argument(None, help="Target datasets: folders, name=folder, or builder names "
                                                  "(mni152-brain-2mm, mni152-brain-3mm, nuclei, invesalius-ct, and "
                                                  "the simulated scanner shifts mni152-{brain,tissue}-{bias,gamma,"
                                                  "gibbs,blur,lowres,noise})."),
    out: str = typer.Option(..., "--out", help="Folder for dg_table.{csv,json,md} and dg_per_case.csv."),
    modes: List[str] = typer.Option([], "--mode", help="Inference modes to compare (e.g. --mode grid --mode box)."),
    gt_slices_only: bool = typer.Option(False, "--gt-slices-only", help="Score only slices with ground truth."),
    release_gt_range: bool = typer.Option(False, "--release-gt-range",
                                          help="With --gt-slices-only: leave out each case's last GT slice "
                                               "(DeSAM's z_min <= z < z_max)."),
    border_px: float = typer.Option(0, "--border-px", help="Zero predictions within this many pixels of each slice "
                                                           "edge, per 256 px of slice (DeSAM: 50)."),
    sites: Optional[str] = typer.Option(None, "--sites", help="A multi-site prostate root: every site except the "
                                                              "run's source site is a target (one row per site)."),
    device: str = typer.Option("auto", "--device"),
    clicks: int = typer.Option(0, "--clicks", help="Interactive methods (msam): score after N corrective clicks per "
                                                   "slice simulated from the ground truth."),
):
    """Single-source domain generalisation: score one trained run on its test split and on each target dataset."""
    from rich.table import Table

    from .errors import ConfigError
    from .evaluation.protocols.domain_generalisation import TABLE_COLUMNS, evaluate_domain_generalisation

    if not targets and sites is None:
        raise ConfigError("give target datasets or --sites")
    rows = evaluate_domain_generalisation(run, targets or [], out, modes=modes or None, gt_slices_only=gt_slices_only,
                                          release_gt_range=release_gt_range, border_px=border_px, sites=sites,
                                          device=device, clicks=clicks, progress=lambda msg: console.print(msg))
    table = Table(title="domain generalisation")
    for c in TABLE_COLUMNS:
        table.add_column(c)
    for r in rows:
        table.add_row(*[f"{r[c]:.3f}" if isinstance(r.get(c), float) else str(r.get(c, "")) for c in TABLE_COLUMNS])
    Console().print(table)


evaluate_app.command("dg")(evaluate_dg)
app.command("evaluate-dg", help="Alias of `samadapt evaluate dg` (the old name, kept for one release): single-source "
                                "domain generalisation of one trained run.")(evaluate_dg)


@evaluate_app.command("refinement")
@friendly
def evaluate_refinement_cmd(
    checkpoint: str = typer.Option(..., "--checkpoint", help="A trained msam checkpoint (.safetensors)."),
    data: str = typer.Option(..., "--data", help="Dataset folder (its test split is scored unless --case)."),
    out: str = typer.Option(..., "--out", help="Folder for refinement.{json,md} and refinement_curve.png."),
    cases: List[str] = typer.Option([], "--case", help="Case id to score (repeatable; default the test split)."),
    iterations: int = typer.Option(5, "--iterations", help="Refinement iterations (= clicks when simulated)."),
    modes: List[str] = typer.Option([], "--mode", help="auto | simulate (repeatable; default both)."),
    baselines: List[str] = typer.Option([], "--baseline", help="NAME=DICE drawn as a horizontal line (repeatable)."),
    batch_size: int = typer.Option(4, "--batch-size", help="Slices per forward pass."),
    threads: Optional[int] = typer.Option(None, "--threads", help="torch CPU threads."),
):
    """M-SAM refinement curves: 3D Dice of each case after every iteration, automatic and with simulated clicks."""
    from .errors import ConfigError
    from .evaluation.protocols.refinement import MODES, evaluate_refinement, refinement_markdown

    lines = {}
    for name, value in _named(baselines, "--baseline", "DICE").items():
        try:
            lines[name] = float(value)
        except ValueError:
            raise ConfigError(f"--baseline {name}={value}: the Dice must be a number") from None
    _threads(threads)
    result = evaluate_refinement(checkpoint, data, out, cases=cases or None, iterations=iterations,
                                 modes=modes or MODES, batch_size=batch_size, baselines=lines)
    Console().print(refinement_markdown(result), highlight=False)


@evaluate_app.command("prompting")
@friendly
def evaluate_prompting_cmd(
    data: str = typer.Option(..., "--data", help="Dataset folder (its test cases are scored)."),
    runs: List[str] = typer.Option(..., "--run", help="NAME=RUN_DIR of a trained promise run (repeatable)."),
    out: str = typer.Option(..., "--out", help="Folder for promise_prompting.{json,md} and points_*.png."),
    cache: Optional[str] = typer.Option(None, "--cache", help="Embedding cache folder (default: each run's own)."),
    bad: float = typer.Option(0.8, "--bad", help="2D Dice below which a slice counts as bad (gets user clicks)."),
    clicks: int = typer.Option(3, "--clicks", help="Simulated user clicks per bad slice."),
    batch_size: int = typer.Option(8, "--batch-size", help="Slices per forward pass."),
    threads: Optional[int] = typer.Option(2, "--threads", help="torch CPU threads."),
):
    """ProMISe prompting study: automatic (APM) points, ground-truth points, and simulated user corrections."""
    from .evaluation.protocols.prompting import evaluate_prompting, prompting_markdown

    _threads(threads)
    rows = evaluate_prompting(data, _named(runs, "--run", "RUN_DIR"), out, cache=cache, bad=bad, clicks=clicks,
                              batch_size=batch_size, progress=lambda msg: console.print(msg, highlight=False))
    Console().print(prompting_markdown(rows, bad=bad, clicks=clicks), highlight=False)


@evaluate_app.command("light-decoder")
@friendly
def evaluate_light_decoder_cmd(
    runs: List[str] = typer.Option(..., "--run", help="NAME=RUN_DIR of a trained hetersam run (repeatable)."),
    out: str = typer.Option(..., "--out", help="Folder for results.{json,md}."),
    timing_slices: int = typer.Option(16, "--timing-slices", help="Test slices on which the encoder is timed."),
    batch_size: int = typer.Option(8, "--batch-size", help="Slices per forward pass."),
    threads: Optional[int] = typer.Option(None, "--threads", help="torch CPU threads."),
):
    """HeterSAM's light decoder against the full path: 3D test accuracy of both and speed ratios."""
    from .evaluation.protocols.light_decoder import evaluate_light_decoder, light_decoder_markdown

    _threads(threads)
    rows = evaluate_light_decoder(_named(runs, "--run", "RUN_DIR"), out, timing_slices=timing_slices,
                                  batch_size=batch_size)
    Console().print(light_decoder_markdown(rows), highlight=False)


@app.command()
@friendly
def cache(
    data: str = typer.Option(..., "--data", help="Dataset folder."),
    backbone: str = typer.Option("litemedsam", "--backbone"),
    checkpoint: Optional[str] = typer.Option(None, "--checkpoint"),
    intermediates: bool = typer.Option(False, "--intermediates", help="Also cache intermediate feature maps."),
    cache_dir: Optional[str] = typer.Option(None, "--cache-dir", help="Default: $SAMADAPT_HOME/embeddings."),
    batch_size: int = typer.Option(4, "--batch-size"),
    set_: List[str] = typer.Option([], "--set", help="Dotted data.* overrides (axis, window, ...)."),
):
    """Precompute the frozen encoder's outputs for every slice of a dataset."""
    from .backbones import build_backbone
    from .engine.embedding_cache import EmbeddingCache
    from .data.slices import SliceDataset
    from .engine.run import geometry_config, intensity_config, open_source
    from .backbones.weights import cache_dir as default_cache

    cfg = _config(None, set_, **{"data.path": data})
    source = open_source(cfg.data)
    bb = build_backbone(backbone, checkpoint=checkpoint).eval()
    ds = SliceDataset(source.load_all(), bb.input_size, axis=cfg.data.axis, intensity=intensity_config(cfg.data),
                      geometry=geometry_config(cfg.data))
    store = EmbeddingCache(Path(cache_dir) if cache_dir else default_cache() / "embeddings", bb, intermediates)
    n, size = store.precompute(ds, batch_size=batch_size)
    console.print(f"{store.summary(n)}; {size / 2**20:.1f} MiB on disk ({size / max(n, 1) / 2**20:.2f} MiB/slice)")


@data_app.command("check")
@friendly
def data_check(path: str = typer.Argument(..., help="Dataset folder."),
               format: str = typer.Option("auto", "--format", help="auto | nnunet | folder2d | npz | dicom.")):
    """Validate a dataset before training and print a summary (like nnU-Net's integrity check)."""
    from .data.check import check_dataset, print_check

    report = check_dataset(path, format)
    print_check(report)
    if report.get("errors"):
        raise typer.Exit(1)


@data_app.command("build")
@friendly
def data_build(name: str = typer.Argument(..., help="mni152-brain | mni152-tissue | nuclei | invesalius-ct."),
               out: str = typer.Argument(..., help="Folder to write the dataset into (created; reused if complete).")):
    """Build one of the small real demo datasets in nnU-Net raw format."""
    from .data.demo_data import DEMO_DATASETS

    if name not in DEMO_DATASETS:
        raise typer.BadParameter(f"unknown dataset {name!r}; choose from {', '.join(DEMO_DATASETS)}")
    path = DEMO_DATASETS[name](out)
    console.print(f"built {name} at {path}")


@app.command()
def info():
    """Backbones, methods, device and versions."""
    import torch
    from rich.table import Table

    from .backbones import BACKBONES
    from .engine.device import cpu_capabilities, resolve_device
    from .engine.fast import FastOptions
    from .engine.manifest import package_versions
    from .engine.openvino_session import openvino_available
    from .engine.path_choice import auto_paths
    from .methods import METHODS
    from .backbones.weights import cache_dir

    out = Console()
    table = Table(title="methods")
    for col in ("name", "classes", "encoder", "promptable", "trains"):
        table.add_column(col)
    for name in METHODS.names():
        cls = METHODS.get(name)
        enc = "none" if not cls.uses_backbone else ("trained (LoRA)" if cls.needs_encoder_grad else "frozen, cached")
        classes = "any" if cls.max_classes is None else f"{cls.max_classes} (one-vs-rest for more)"
        table.add_row(name, classes, enc, "yes" if cls.promptable else "no", "yes" if cls.trainable else "no")
    out.print(table)
    out.print("backbones (decoder trained with): " + ", ".join(
        f"{n} ({'/'.join(BACKBONES.get(n).trained_prompts)})" for n in BACKBONES.names()), highlight=False)
    device = resolve_device("auto")
    out.print(f"device: {device} (torch threads {torch.get_num_threads()})")
    cpu = cpu_capabilities()
    out.print(f"cpu: {cpu['cpu']}, {cpu['cores']} logical cores; SIMD: {', '.join(cpu['simd']) or 'none found'}; "
              f"torch kernels {cpu['torch_kernels']}; native bf16: {'yes' if cpu['bf16_native'] else 'no'}",
              highlight=False)
    precision = ("bf16 autocast (--bf16 off for fp32)" if FastOptions().amp(device) == "bf16"
                 else "fp32 (no native bf16; --bf16 on forces it)")
    out.print(f"predict --fast here: conv+BN fusion, channels-last, LoRA merge, {precision}", highlight=False)
    openvino = "installed" if openvino_available() else "not installed (pip install 'samadapt[openvino]')"
    out.print(f"predict --fast times here: exact, {', '.join(auto_paths(device))} (the graph paths for models that "
              f"export); openvino {openvino}", highlight=False)
    out.print(f"weights cache: {cache_dir()}")
    out.print("versions: " + ", ".join(f"{k} {v}" for k, v in package_versions().items()))


@app.command()
@friendly
def compare(
    data: str = typer.Argument(..., help="Dataset folder, or a demo dataset name (mni152-brain, mni152-tissue, "
                                         "nuclei, invesalius-ct) built into OUT/data."),
    models: List[str] = typer.Option(..., "--model", "-m", help="'LABEL=PRESET [key=value ...]' or "
                                                               "'LABEL=@OTHER [key=value ...]'; repeat."),
    out: str = typer.Option(..., "--out", help="Folder for runs/, cache/ and report/ (finished runs are reused)."),
    minutes: Optional[float] = typer.Option(None, "--minutes", help="Training budget per model (wall minutes)."),
    epochs: Optional[int] = typer.Option(None, "--epochs", help="Epochs per model (instead of the presets'); with "
                                                                "--patience the most."),
    patience: Optional[int] = typer.Option(None, "--patience", help="Convergence budget: stop a model after this "
                                                                    "many validations without a better val Dice."),
    seeds: str = typer.Option("0", "--seeds", help="Comma-separated training seeds, e.g. 0,1,2."),
    threads: Optional[int] = typer.Option(None, "--threads", help="torch CPU threads (default: all cores)."),
    overrides: List[str] = typer.Option([], "--set", help="key.sub=value applied to every model; repeat."),
    title: str = typer.Option("comparison", "--title"),
    report: str = typer.Option("report", "--report", help="Report folder name inside OUT."),
    targets: List[str] = typer.Option([], "--target", help="Also score on this dataset's test split, models "
                                                           "unchanged: a folder, NAME=folder or a demo name such as "
                                                           "mni152-tissue-bias (built into OUT/data); repeat."),
):
    """Train several models with the same budget and compare them on the test split in one report."""
    from .evaluation.compare import ModelSpec
    from .evaluation.compare import compare as run_compare
    from .evaluation.protocols.domain_generalisation import resolve_target
    from .data.demo_data import DEMO_DATASETS, build_demo

    path = Path(data)
    if not path.exists() and data in DEMO_DATASETS:
        path = build_demo(data, Path(out) / "data" / data)
    run_compare(path, [ModelSpec.parse(m) for m in models], out, minutes=minutes, epochs=epochs, patience=patience,
                seeds=[int(s) for s in seeds.split(",")], threads=threads, common=overrides, title=title,
                report=report, targets=[resolve_target(t, Path(out) / "data") for t in targets])


@app.command()
@friendly
def demo(
    out: str = typer.Option("demo_output", "--out", help="Folder for the dataset, runs and report."),
    method: str = typer.Option("decoder", "--method", help="Method to train and compare with the baselines."),
    minutes: Optional[float] = typer.Option(None, "--minutes", help="Wall-clock training budget per model "
                                                                    "(CPU-dependent) instead of convergence."),
    threads: Optional[int] = typer.Option(None, "--threads", help="torch CPU threads (default: all cores)."),
    baselines: bool = typer.Option(True, "--baselines/--no-baselines", help="Also run unet and box-prompt."),
):
    """Few-label MNI152 tissue (10 % of the slices) on litemedsam: METHOD against the U-Net and zero-shot SAM, trained
    to convergence, scored on the test slab and under a simulated scanner shift; writes a report."""
    from .bench.demo import run_demo

    run_demo(Path(out), method=method, minutes=minutes, threads=threads, baselines=baselines)


@app.command()
@friendly
def benchmark(
    out: str = typer.Option("bench_out", "--out", help="Folder for the part results (JSON), runs and RESULTS.md."),
    parts: str = typer.Option("accuracy,latency,cost,volume", "--parts",
                              help="Comma-separated parts to run; '' only rewrites the report from OUT's results."),
    tasks: str = typer.Option("mni152-brain,mni152-tissue,mni152-tissue-10,nuclei", "--tasks",
                              help="Accuracy tasks (mni152-brain, mni152-tissue, mni152-tissue-10, nuclei)."),
    backbones: str = typer.Option("litemedsam", "--backbones", help="Accuracy part: every task on each of these "
                                                                    "backbones, e.g. litemedsam,mobilesam."),
    shifts: bool = typer.Option(True, "--shifts/--no-shifts", help="Accuracy part: also score the tissue models "
                                                                   "on the simulated scanner shifts."),
    models: Optional[str] = typer.Option(None, "--models", help="Accuracy part: only these model labels, e.g. "
                                                                "decoder,unet,box-prompt-gt (default all); "
                                                                "-LABEL leaves one out (--models=-hsam-stage1)."),
    seeds: str = typer.Option("0,1,2", "--seeds", help="Training seeds of the accuracy part."),
    budget: str = typer.Option("converge", "--budget", help="Accuracy part: converge (until validation stops "
                                                            "improving) | minutes (wall clock, CPU-dependent)."),
    patience: int = typer.Option(5, "--patience", help="converge: validations without improvement before a stop."),
    max_epochs: int = typer.Option(100, "--max-epochs", help="converge: the most epochs per model."),
    minutes: float = typer.Option(1.5, "--minutes", help="minutes: training budget per model and seed."),
    methods: Optional[str] = typer.Option(None, "--methods", help="Methods of the latency/cost parts (default all)."),
    images: int = typer.Option(4, "--images", help="Pictures per latency row."),
    batch: int = typer.Option(4, "--batch", help="Batch size of the batched latency rows."),
    threads: int = typer.Option(2, "--threads", help="torch / ONNX Runtime threads."),
    profile: bool = typer.Option(True, "--profile/--no-profile", help="Profile the fast decoder path (latency)."),
    steps: int = typer.Option(2, "--steps", help="Training steps per epoch of the cost part."),
    volume: List[str] = typer.Option([], "--volume", help="METHOD:VARIANT[:BATCH] (plain|fast|fast-bf16|onnx|int8|"
                                                           "openvino|auto; "
                                                           "batch 8) of the 3D part; repeat. Default: decoder:fast:8, "
                                                           "decoder:fast:1, decoder:int8:1, unet:fast:8."),
    backbone: str = typer.Option("litemedsam", "--backbone", help="Backbone of the latency/cost/volume parts."),
    trained: Optional[str] = typer.Option(None, "--trained", help="Latency/volume parts: time each method's trained "
                                                                  "run in this folder (e.g. OUT/accuracy/"
                                                                  "mni152-tissue-10/runs), else an untrained head."),
    results: Optional[str] = typer.Option(None, "--results", help="Report path (default OUT/RESULTS.md)."),
):
    """Benchmark every method: accuracy over seeds, prediction latency against stock, training cost, 3D time."""
    from .bench import volume as volume_part
    from .bench.run import run_benchmark

    path = run_benchmark(out, [p for p in parts.split(",") if p], tasks=tasks.split(","), seeds=[int(s) for s in seeds.split(",")],
                         budget=budget, minutes=minutes, patience=patience, max_epochs=max_epochs,
                         methods=methods.split(",") if methods else None, images=images,
                         batch=batch, threads=threads, profile=profile, steps=steps,
                         volume_runs=volume or volume_part.DEFAULT_RUNS, backbone=backbone,
                         backbones=backbones.split(","), shifts=shifts,
                         models=models.split(",") if models else (), trained=trained, results=results)
    console.print(f"report: {path}")


@app.command()
@friendly
def export(
    out: str = typer.Argument(..., help="ONNX file to write (e.g. model.onnx); written only if the check passes."),
    run: Optional[str] = typer.Option(None, "--run", help="A run folder from `samadapt train` (uses best)."),
    checkpoint: Optional[str] = typer.Option(None, "--checkpoint", help="A .safetensors checkpoint."),
    config: Optional[str] = typer.Option(None, "--config", help="Run file for zero-shot methods (box-prompt)."),
    set_: List[str] = typer.Option([], "--set", help="Dotted override for --config."),
    num_classes: int = typer.Option(1, "--num-classes", help="Foreground classes, for --config only."),
    int8: bool = typer.Option(False, "--int8", help="Write an int8 model (dynamic quantisation of the MatMul/Gemm "
                                                     "weights), checked against the fp32 export's classes."),
):
    """Export a model to ONNX (image -> class probabilities), verified against PyTorch with ONNX Runtime."""
    import tempfile

    from .engine.export import export_predictor, quantize_int8
    from .engine.predict import Predictor

    if run:
        from .engine.rundir import resolve_checkpoint

        checkpoint = str(resolve_checkpoint(run))
    if bool(checkpoint) == bool(config):
        raise typer.BadParameter("give exactly one of --run, --checkpoint or --config")
    if checkpoint:
        predictor = Predictor.from_checkpoint(checkpoint, device="cpu", batch_size=1)
    else:
        predictor = Predictor.from_config(_config(config, set_), num_classes, device="cpu", batch_size=1)
    with tempfile.TemporaryDirectory() as tmp:
        fp32 = Path(tmp) / "fp32.onnx" if int8 else Path(out)
        meta = export_predictor(predictor, fp32, {"source": checkpoint or config})
        console.print(f"{'checked' if int8 else 'wrote ' + out}: method {meta['method']}, {meta['num_classes']} "
                      f"class(es), {meta['input_size']} px; ONNX Runtime vs PyTorch max |diff| "
                      f"{meta['check_max_abs_error']:.1e}")
        if int8:
            meta = quantize_int8(fp32, out)
            console.print(f"wrote {out}: int8; classes agree with fp32 on {meta['int8_check_agreement']:.4f} of the "
                          f"check pixels, mean |probability diff| {meta['int8_check_mean_abs_error']:.1e}")


@app.command()
@friendly
def serve(
    run: Optional[str] = typer.Option(None, "--run", help="A run folder from `samadapt train` (uses best)."),
    config: Optional[str] = typer.Option(None, "--config", help="Run file or preset for zero-shot methods "
                                                                "(box-prompt)."),
    set_: List[str] = typer.Option([], "--set", help="Dotted override for --config."),
    num_classes: int = typer.Option(1, "--num-classes", help="Foreground classes, for --config only."),
    host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on; beyond loopback a token is "
                                                         "printed and required."),
    port: int = typer.Option(8000, "--port"),
    folder: Optional[str] = typer.Option(None, "--folder", help="A folder whose files the page may open by name."),
    max_upload_mb: int = typer.Option(1024, "--max-upload-mb", help="Largest accepted upload."),
    device: str = typer.Option("auto", "--device"),
    fast: bool = typer.Option(False, "--fast", help="Whole-volume prediction on the fastest path within tolerance "
                                                    "(as predict --fast: chosen by timing the first volume's first "
                                                    "batch; ONNX graphs cached); clicks stay on the exact model."),
):
    """A web page to look at the model's predictions and correct them (clicks, box, brush); its HTTP API is described
    at /openapi.json (and /docs, whose viewer needs an online browser)."""
    from .serve import load_model, run_server

    if bool(run) == bool(config):
        raise typer.BadParameter("give exactly one of --run or --config")
    model = load_model(run=run, device=device, fast=fast) if run else \
        load_model(config=_config(config, set_, **{"train.device": device}), num_classes=num_classes, device=device,
                   fast=fast)
    run_server(model, host=host, port=port, folder=folder, max_upload_mb=max_upload_mb,
               say=lambda msg: console.print(msg, highlight=False, soft_wrap=True))


def main() -> None:
    os.environ.setdefault("PYTHONWARNINGS", "ignore::FutureWarning")
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning)
    app()


if __name__ == "__main__":
    sys.exit(main())
