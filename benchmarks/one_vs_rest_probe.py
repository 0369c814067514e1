"""What does combining per-class masks into one label map cost? Each head's own mask against the combined map.

One-vs-rest models (ProMISe's heads, the K boxes of ``box-prompt`` mode ``gt``) predict one mask per class; the
protocol scores the label map their combination gives (argmax, so overlapping masks go to the most confident
class). This probe scores, over the foreground slices (every ``--stride``-th) of the first test case, Dice per
class of (a) class k's own mask at probability 0.5 and (b) the combined label map, for each ``--checkpoint``
(a trained one-vs-rest run) and for the oracle box on each ``--oracle`` backbone.

    OMP_NUM_THREADS=1 python benchmarks/one_vs_rest_probe.py OUT/accuracy/mni152-tissue-10/data/mni152-tissue \\
        --oracle litemedsam --oracle mobilesam --checkpoint RUN/checkpoints/best.safetensors
"""

from __future__ import annotations

import argparse
import json

import torch

from samadapt.backbones import build_backbone
from samadapt.data.readers import open_dataset
from samadapt.data.slices import collate, volume_slices
from samadapt.engine.predict import Predictor
from samadapt.methods import build_method


def own_masks(method, batch: dict) -> torch.Tensor:
    """B x K booleans: each class's own mask (its head, or its box), before any combination."""
    if hasattr(method, "heads"):
        return torch.cat([head.predict(method._binary_batch(batch, k))[:, 1:2]
                          for k, head in enumerate(method.heads, start=1)], dim=1) > 0.5
    return method.forward(batch)["logits"][:, 1:] > 0


def score(method, items: list[dict], classes: list[int]) -> dict:
    """{"own": [Dice per class], "combined": [Dice per class]} over ``items``, 3D (summed over slices)."""
    sums = {rule: torch.zeros(2, len(classes)) for rule in ("own", "combined")}
    for start in range(0, len(items), 4):
        batch = collate(items[start:start + 4])
        batch["image"] = batch["image"].float()
        with torch.no_grad():
            batch["features"] = method.features(batch)
            own = own_masks(method, batch)
            combined = method.predict(batch).argmax(1)
        for i, k in enumerate(classes):
            truth = batch["label"] == k
            for rule, mask in (("own", own[:, k - 1]), ("combined", combined == k)):
                sums[rule][0, i] += float((mask & truth).sum())
                sums[rule][1, i] += float(mask.sum() + truth.sum())
    return {rule: [round(2 * a / max(b, 1.0), 3) for a, b in s.T.tolist()] for rule, s in sums.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data", help="a labelled nnU-Net dataset folder")
    parser.add_argument("--checkpoint", action="append", default=[], help="a trained one-vs-rest run (repeat)")
    parser.add_argument("--oracle", action="append", default=[], help="a backbone for box-prompt gt (repeat)")
    parser.add_argument("--stride", type=int, default=4)
    args = parser.parse_args()
    source = open_dataset(args.data)
    case = source.load(source.make_split().test[0])
    classes = sorted(int(c) for c in torch.unique(torch.as_tensor(case.label)).tolist() if c > 0)
    models = [(f"box-prompt-gt@{name}", build_method("box-prompt", build_backbone(name), {"mode": "gt"},
                                                     len(classes))) for name in args.oracle]
    models += [(path, Predictor.from_checkpoint(path, device="cpu").method) for path in args.checkpoint]
    for label, method in models:
        method.eval()
        items = [it for it in volume_slices(case, 0, method.input_size) if torch.as_tensor(it["label"]).any()]
        items = items[::args.stride]
        print(json.dumps({"model": label, "backbone": method.backbone.name, "slices": len(items),
                          "classes": classes, **score(method, items, classes)}), flush=True)


if __name__ == "__main__":
    main()
