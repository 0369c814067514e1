"""ProMISe APM probe: a short training run on real data that reports Dice and where the APM puts its points.

Builds the MNI152 brain task (or the nuclei tiles) with ``samadapt.data.demo_data``, encodes a few training and
validation slices once with the frozen LiteMedSAM (intermediates included), then trains a ProMISe model on them for
``--steps`` Adam steps (batch ``--batch``), evaluating every ``--every`` steps on the validation slices:

- ``dice``: mean 2D Dice of the thresholded (0.5) low-resolution output against the label at the same size;
- where the APM put its points on the validation slices (``samadapt.evaluation.protocols.prompting.point_facts``):
  ``spread_px`` (0 = the same pattern for every image), ``border`` (a collapsed APM: ~1), ``positive_on_fg``,
  ``negative_on_fg``.

Options after ``--set`` are ProMISe options (``key=value``, YAML values). Prints one JSON line per evaluation.

    OMP_NUM_THREADS=1 python benchmarks/promise_apm_probe.py --task brain --steps 150 --lr 3e-3 \\
        --set mode=apm feature_channels=64 feature_grid=32
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import yaml

from samadapt.backbones import Features, build_backbone
from samadapt.data.demo_data import build_mni152, build_nuclei
from samadapt.data.readers import open_dataset
from samadapt.data.slices import SliceDataset, collate
from samadapt.evaluation.protocols.prompting import point_facts
from samadapt.methods import build_method


def slices(ds: SliceDataset, n: int, fg_only: bool) -> list[dict]:
    keep = set(ds.foreground_keys()) if fg_only else None
    idx = [i for i, k in enumerate(ds.slice_keys) if keep is None or k in keep]
    picks = [idx[int(j)] for j in torch.linspace(0, len(idx) - 1, min(n, len(idx)))]
    return [ds[i] for i in picks]


def encode(backbone, items: list[dict], layers, chunk: int = 4) -> dict:
    batch = collate(items)
    parts = []
    with torch.no_grad():
        for i in range(0, len(items), chunk):
            x = backbone.preprocess(batch["image"][i:i + chunk])
            parts.append(backbone.encode(x, intermediates=layers))
    feats = Features(torch.cat([f.embedding for f in parts]),
                     [torch.cat([f.intermediates[j] for f in parts]) for j in range(len(parts[0].intermediates))])
    return {"label": batch["label"], "features": feats}


def evaluate(method, data: dict) -> dict:
    method.eval()
    with torch.no_grad():
        out = method({"features": data["features"], "label": data["label"]})
    method.train()
    logits, pts = out["logits"], out["points"]
    target = torch.nn.functional.interpolate(data["label"][:, None].float(), size=logits.shape[-2:], mode="nearest")
    pred = (logits > 0).float()
    inter = (pred * target).flatten(1).sum(1)
    denom = pred.flatten(1).sum(1) + target.flatten(1).sum(1)
    dice = torch.where(denom > 0, 2 * inter / denom.clamp_min(1), torch.ones_like(denom))
    return {"dice": round(float(dice.mean()), 4),
            **point_facts(pts, out["point_labels"], data["label"], method.input_size)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--task", choices=["brain", "nuclei"], default="brain")
    ap.add_argument("--data-dir", default="/tmp/promise_probe")
    ap.add_argument("--train", type=int, default=16, help="training slices (foreground ones, spread over the case)")
    ap.add_argument("--val", type=int, default=8)
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--every", type=int, default=25)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--set", nargs="*", default=[], help="ProMISe options key=value")
    args = ap.parse_args()
    options = {k: yaml.safe_load(v) for k, v in (s.split("=", 1) for s in args.set)}

    root = Path(args.data_dir)
    if args.task == "brain":
        path = build_mni152(root / "brain", task="brain")
        train_case, val_case = "mni152_train", "mni152_val"
    else:
        path = build_nuclei(root / "nuclei")
        train_case = val_case = None
    source = open_dataset(path)
    backbone = build_backbone("litemedsam").eval()
    torch.manual_seed(args.seed)
    method = build_method("promise", backbone, options)
    if train_case is None:  # nuclei: tiles are cases; first 3/4 train, last 1/4 validation
        cases = list(source.case_ids)
        cut = 3 * len(cases) // 4
        train_ds = SliceDataset(source.load_all(cases[:cut]), backbone.input_size)
        val_ds = SliceDataset(source.load_all(cases[cut:]), backbone.input_size)
    else:
        train_ds = SliceDataset([source.load(train_case)], backbone.input_size)
        val_ds = SliceDataset([source.load(val_case)], backbone.input_size)
    t0 = time.perf_counter()
    layers = method.intermediates or backbone.intermediate_layers  # ips_gt needs none: share the stored file
    stored = root / f"features_{args.task}_{args.train}_{args.val}_{'-'.join(map(str, layers))}.pt"
    if stored.is_file():  # encoder outputs of an earlier probe with the same slices and layers
        train, val = torch.load(stored, weights_only=False)
    else:
        train = encode(backbone, slices(train_ds, args.train, True), layers)
        val = encode(backbone, slices(val_ds, args.val, True), layers)
        torch.save((train, val), stored)
    print(json.dumps({"encoded_s": round(time.perf_counter() - t0, 1), "train": len(train["label"]),
                      "val": len(val["label"]), "options": options, "lr": args.lr}), flush=True)
    opt = torch.optim.Adam(method.param_groups(args.lr))
    g = torch.Generator().manual_seed(args.seed)
    n = len(train["label"])
    print(json.dumps({"step": 0, **evaluate(method, val)}), flush=True)
    method.train()
    for step in range(1, args.steps + 1):
        idx = torch.randperm(n, generator=g)[: args.batch]
        batch = {"features": train["features"].index(idx), "label": train["label"][idx]}
        loss = method.loss(method(batch), batch)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % args.every == 0 or step == args.steps:
            print(json.dumps({"step": step, "loss": round(float(loss), 4), **evaluate(method, val)}), flush=True)


if __name__ == "__main__":
    main()
