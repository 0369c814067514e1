"""Where a trained ProMISe run's APM puts its points, per one-vs-rest head, on foreground slices of a test case.

For each head (class k): ``border`` (fraction of points within 2 % of the image side from an edge), ``spread``
(per point, the std of its position over the slices, averaged, px: 0 = one fixed pattern for every image),
``on_class`` (fraction of the positive points that fall on class k) and ``mean_prob`` (the head's mean
foreground probability). Reads the frozen encoder's embedding cache of the run's data where present.

    OMP_NUM_THREADS=1 python benchmarks/promise_points_probe.py \\
        OUT/accuracy/mni152-tissue-10/runs/promise/seed0 OUT/accuracy/mni152-tissue-10/data/mni152-tissue
"""

from __future__ import annotations

import argparse
import json

import torch

from samadapt.data.readers import open_dataset
from samadapt.engine.predict import Predictor
from samadapt.engine.rundir import RunDir
from samadapt.evaluation.compare import volume_slices


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run")
    parser.add_argument("data")
    parser.add_argument("--case", default=None, help="test case id (default: the first test case)")
    parser.add_argument("--slices", type=int, default=4)
    args = parser.parse_args()
    predictor = Predictor.from_checkpoint(RunDir(args.run).best_checkpoint, device="cpu", use_cache=True)
    source = open_dataset(args.data)
    case = source.load(args.case or source.make_split().test[0])
    items = volume_slices(case, predictor.axis, predictor.method.input_size, predictor.intensity, predictor.geometry)
    fg = [i for i, item in enumerate(items) if item["label"].any()]
    picks = [items[i] for i in fg[::max(1, len(fg) // args.slices)][:args.slices]]
    predictor.batch_size = len(picks)
    probs = torch.stack(predictor.predict_probabilities(picks))  # N x (K + 1) x S x S
    labels = torch.stack([torch.as_tensor(item["label"]) for item in picks])  # N x S x S
    heads = getattr(predictor.method, "heads", [predictor.method])
    for k, head in enumerate(heads, start=1):
        points, point_labels, size = head.last_points, head.last_point_labels, head.input_size  # N x P x 2 (x, y)
        xy = points.round().long().clamp(0, size - 1)
        on = torch.stack([labels[n, xy[n, :, 1], xy[n, :, 0]] == k for n in range(len(picks))])
        print(json.dumps({"class": k, "points": list(points.shape),
                          "border": round(float(((points < 0.02 * size) | (points > 0.98 * size)).any(-1)
                                                .float().mean()), 3),
                          "spread": round(float(points.std(0).mean()), 2),
                          "on_class": round(float(on[point_labels > 0].float().mean()), 3),
                          "class_fraction": round(float((labels == k).float().mean()), 3),
                          "mean_prob": round(float(probs[:, k].mean()), 4)}))


if __name__ == "__main__":
    main()
