"""torch.compile (inductor, CPU) against the eager fast paths and the OpenVINO graph, side by side in one process.

For a trained run: the eager fast path (fp32, and bf16 where the CPU computes it natively), the same with the image
encoder compiled by ``torch.compile`` (the first call's compile time reported apart), and the ``openvino`` path
where installed; seconds per slice on ``--slices`` slices of the first test case (the second ``--slices`` of its
first slices, in one batch), median of ``--rounds`` interleaved rounds, with the foreground Dice of each against
the exact path. Ratios are within this run only.

    python benchmarks/compile_probe.py RUN --data DATASET --threads 2
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from samadapt.data.readers import open_dataset
from samadapt.engine.fast import FastOptions, bf16_native
from samadapt.engine.openvino_session import openvino_available
from samadapt.engine.path_choice import first_slices, pin, variant
from samadapt.engine.predict import Predictor
from samadapt.overlap import foreground_dice


def timed(predictor: Predictor, items: list[dict]) -> tuple[float, torch.Tensor]:
    start = time.perf_counter()
    probs = torch.stack(predictor.predict_probabilities(items))
    return (time.perf_counter() - start) / len(items), probs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run")
    parser.add_argument("--data", required=True, help="dataset whose first test case gives the slices")
    parser.add_argument("--slices", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    exact = Predictor.from_run(args.run, device="cpu")
    source = open_dataset(args.data)
    items = first_slices(exact, [source.load(source.make_split().test[0])], 2 * args.slices)[args.slices:]
    exact.batch_size = len(items)
    reference = torch.stack(exact.predict_probabilities(items))
    fast = {"fast-fp32": FastOptions(bf16="off")}
    if bf16_native(exact.device):
        fast["fast-bf16"] = FastOptions(bf16="on")
    paths = {"exact": exact, **{name: variant(exact, len(items), options) for name, options in fast.items()}}
    for name, options in fast.items():
        compiled = variant(exact, len(items), options)
        compiled.predict_probabilities(items)  # the fast options' one-time preparation (fusion, LoRA merge)
        encoder = compiled.method.image_encoder_module
        owner, attr = next((m, a) for m in compiled.method.modules() for a, child in m.named_children()
                           if child is encoder)
        setattr(owner, attr, torch.compile(encoder, dynamic=False))
        start = time.perf_counter()
        compiled.predict_probabilities(items)
        print(json.dumps({"path": f"compiled-{name}", "compile_s": round(time.perf_counter() - start, 1)}),
              flush=True)
        paths[f"compiled-{name}"] = compiled
    if openvino_available():
        paths["openvino"] = pin(exact, "openvino", len(items))[0]
    times: dict[str, list[float]] = {n: [] for n in paths}
    dice: dict[str, float] = {}
    for p in paths.values():
        p.predict_probabilities(items)  # warm
    for _ in range(args.rounds):
        for name, predictor in paths.items():
            sec, probs = timed(predictor, items)
            times[name].append(sec)
            dice[name] = foreground_dice(probs.argmax(1), reference.argmax(1), reference.shape[1])
    base = statistics.median(times["exact"])
    for name in paths:
        med = statistics.median(times[name])
        print(json.dumps({"path": name, "s_per_slice": round(med, 3), "ratio_to_exact": round(med / base, 3),
                          "dice_vs_exact": round(dice[name], 4)}), flush=True)


if __name__ == "__main__":
    main()
