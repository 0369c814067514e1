"""H-SAM / SAMed decoder probe: does the decoder leave the all-background prediction, and how fast, per stage?

Builds the MNI152 tissue task (3 classes) with ``samadapt.data.demo_data``, encodes ``--train`` foreground training
slices and ``--val`` validation slices once with the frozen LiteMedSAM, then trains the method's decoders on those
embeddings with its own loss, AdamW (weight decay 0.1) and ``warmup_poly`` (``--warmup`` steps, poly 0.9 over
``--steps``), as the CPU presets do. The LoRA updates stay at their zero init (the encoder is LiteMedSAM's, as at
step 0 of a real run), so this isolates the decoder, loss and schedule from the encoder: a cheap stand-in for the
first steps of a run, not a converged result. Every ``--every`` steps it prints one JSON line per output on the
validation slices: ``dice`` (foreground Dice per slice and class, averaged; :mod:`samadapt.overlap`), ``bg``
(fraction of pixels predicted background; the truth is ``true_bg``) and ``classes`` (the labels predicted anywhere).

    OMP_NUM_THREADS=1 python benchmarks/hsam_background_probe.py --method hsam --steps 150 --lr 1e-3 --warmup 10
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import yaml

from samadapt.backbones import Features, build_backbone
from samadapt.data.demo_data import build_mni152
from samadapt.data.readers import open_dataset
from samadapt.data.slices import SliceDataset, collate
from samadapt.config.run_config import TrainConfig
from samadapt.engine.schedulers import build_scheduler
from samadapt.methods import build_method
from samadapt.methods.base import upsample_to
from samadapt.overlap import class_counts, dice_from_counts


def pick(ds: SliceDataset, n: int) -> dict:
    """``n`` foreground slices spread over the case, collated."""
    keep = set(ds.foreground_keys())
    idx = [i for i, k in enumerate(ds.slice_keys) if k in keep]
    return collate([ds[idx[int(j)]] for j in torch.linspace(0, len(idx) - 1, min(n, len(idx)))])


def encode(backbone, batch: dict, chunk: int = 4) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([backbone.encode(backbone.preprocess(batch["image"][i:i + chunk])).embedding
                          for i in range(0, len(batch["image"]), chunk)])


def outputs(method, out: dict) -> dict[str, torch.Tensor]:
    """Logits B x T x S x S per output: H-SAM's stage 1, stage 2 and their average; SAMed's one output."""
    size = method.input_size
    if "stage2" in out:
        return {"stage1": upsample_to(out["stage1"], size), "stage2": out["stage2"], "average": out["logits"]}
    return {"logits": upsample_to(out["logits"], size)}


def evaluate(method, data: dict, k: int) -> dict:
    method.eval()
    with torch.no_grad():
        out = method({"image": data["image"], "features": data["features"]})
    method.train()
    label = data["label"]
    result = {}
    for name, logits in outputs(method, out).items():
        pred = logits.argmax(1)
        per_slice = torch.stack([class_counts(p, g, range(1, k + 1)) for p, g in zip(pred, label)])
        result[name] = {"dice": round(float(dice_from_counts(per_slice).mean()), 4),
                        "bg": round(float((pred == 0).float().mean()), 3),
                        "classes": sorted(int(c) for c in pred.unique())}
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--method", choices=["hsam", "samed"], default="hsam")
    ap.add_argument("--data-dir", default="/tmp/hsam_probe")
    ap.add_argument("--train", type=int, default=24)
    ap.add_argument("--val", type=int, default=8)
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--every", type=int, default=25)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--set", nargs="*", default=[], help="method options key=value")
    args = ap.parse_args()
    options = {k: yaml.safe_load(v) for k, v in (s.split("=", 1) for s in args.set)}

    root = Path(args.data_dir)
    source = open_dataset(build_mni152(root / "tissue", task="tissue"))
    k = source.num_classes
    backbone = build_backbone("litemedsam").eval()
    t0 = time.perf_counter()
    stored = root / f"embeddings_{args.train}_{args.val}.pt"
    if stored.is_file():
        train, val = torch.load(stored, weights_only=False)
    else:
        train = pick(SliceDataset([source.load("mni152_train")], backbone.input_size), args.train)
        val = pick(SliceDataset([source.load("mni152_val")], backbone.input_size), args.val)
        train = {"image": train["image"], "label": train["label"], "features": encode(backbone, train)}
        val = {"image": val["image"], "label": val["label"], "features": encode(backbone, val)}
        torch.save((train, val), stored)
    torch.manual_seed(args.seed)
    method = build_method(args.method, backbone, options, num_classes=k)
    method.features = lambda batch: Features(batch["features"])  # cached LiteMedSAM embeddings, LoRA unused
    cfg = TrainConfig(lr=args.lr, weight_decay=0.1, scheduler="warmup_poly", warmup_steps=args.warmup)
    opt = torch.optim.AdamW(method.param_groups(args.lr), betas=(0.9, 0.999), weight_decay=0.1)
    sched = build_scheduler(opt, cfg, args.steps)
    true_bg = round(float((val["label"] == 0).float().mean()), 3)
    print(json.dumps({"method": args.method, "options": options, "lr": args.lr, "warmup": args.warmup,
                      "train": len(train["label"]), "val": len(val["label"]), "true_bg": true_bg,
                      "encoded_s": round(time.perf_counter() - t0, 1)}), flush=True)
    print(json.dumps({"step": 0, **evaluate(method, val, k)}), flush=True)
    g = torch.Generator().manual_seed(args.seed)
    n = len(train["label"])
    per_epoch = max(n // args.batch, 1)
    t0 = time.perf_counter()
    method.train()
    for step in range(1, args.steps + 1):
        if (step - 1) % per_epoch == 0:
            method.on_epoch_start((step - 1) // per_epoch, args.steps // per_epoch)
        idx = torch.randperm(n, generator=g)[: args.batch]
        batch = {"image": train["image"][idx], "label": train["label"][idx], "features": train["features"][idx]}
        loss = method.loss(method(batch), batch)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if step % args.every == 0 or step == args.steps:
            seconds = round(time.perf_counter() - t0)
            print(json.dumps({"step": step, "loss": round(float(loss.detach()), 4), "s": seconds,
                              **evaluate(method, val, k)}), flush=True)


if __name__ == "__main__":
    main()
