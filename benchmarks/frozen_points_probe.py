"""Does a backbone's frozen mask decoder follow point prompts? Dice per class from ground-truth points alone.

For every foreground slice (every ``--stride``-th) of the first test case, ProMISe's ``ips_gt`` prompts (8
foreground + 8 background pixels of class k, its seeded sampler) go into the frozen prompt encoder and mask decoder
with no IPS and no training; the mask is output token ``--token`` at probability 0.5, scored against class k over all
those slices, without and with the 5 x 5 opening of ProMISe's presets (applied in the S x S input frame).

    OMP_NUM_THREADS=1 python benchmarks/frozen_points_probe.py OUT/accuracy/mni152-tissue-10/data/mni152-tissue \\
        --backbone litemedsam --backbone mobilesam
"""

from __future__ import annotations

import argparse
import json

import torch

from samadapt.backbones import build_backbone
from samadapt.data.readers import open_dataset
from samadapt.data.slices import collate, volume_slices
from samadapt.methods import build_method
from samadapt.methods.promise import binary_opening


def dice_by_class(backbone, items: list[dict], classes: list[int], token: int, kernel: int) -> dict:
    """{class: (Dice without opening, Dice with the k x k opening)} over ``items`` (one-class prompts per class)."""
    method = build_method("promise", backbone, {"mode": "ips_gt", "output_token": token}, 1).eval()
    method.ips = None  # the frozen decoder alone
    out = {}
    for k in classes:
        inter, total = [0.0, 0.0], [0.0, 0.0]
        for start in range(0, len(items), 8):
            batch = collate(items[start:start + 8])
            label = (batch["label"] == k).long()
            with torch.no_grad():
                mask = method.predict({"image": batch["image"].float(), "label": label})[:, 1:2] > 0.5
            for i, m in enumerate((mask, binary_opening(mask, kernel))):
                inter[i] += float((m[:, 0] & (label > 0)).sum())
                total[i] += float(m.sum() + (label > 0).sum())
        out[k] = tuple(round(2 * a / max(b, 1.0), 3) for a, b in zip(inter, total))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data", help="a labelled nnU-Net dataset folder")
    parser.add_argument("--backbone", action="append", help="repeat (default: litemedsam)")
    parser.add_argument("--stride", type=int, default=4)
    parser.add_argument("--token", type=int, default=1, help="mask token (1: SAM's first multimask output)")
    parser.add_argument("--opening", type=int, default=5)
    args = parser.parse_args()
    source = open_dataset(args.data)
    case = source.load(source.make_split().test[0])
    classes = sorted(int(c) for c in torch.unique(torch.as_tensor(case.label)).tolist() if c > 0)
    for name in args.backbone or ["litemedsam"]:
        backbone = build_backbone(name).eval()
        items = [it for it in volume_slices(case, 0, backbone.input_size) if torch.as_tensor(it["label"]).any()]
        items = items[::args.stride]
        for k, (plain, opened) in dice_by_class(backbone, items, classes, args.token, args.opening).items():
            print(json.dumps({"backbone": name, "slices": len(items), "class": k, "token": args.token,
                              "dice": plain, f"dice_opening{args.opening}": opened}), flush=True)


if __name__ == "__main__":
    main()
