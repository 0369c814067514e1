"""Seconds per click of `samadapt serve` (through its HTTP API, in process): the first click on a slice (encoder +
decoder) and the following ones (decoder only, the slice embedding reused).

    OMP_NUM_THREADS=2 python benchmarks/serve_click_latency.py [--config box_prompt_whole] [--clicks 10] [IMAGE]

IMAGE defaults to the MNI152 1 mm template (nilearn). Prints the medians and the ratio of a later click to the
first, plus the load average, since the machine may be shared.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("image", nargs="?")
    ap.add_argument("--config", default="box_prompt_whole")
    ap.add_argument("--clicks", type=int, default=10)
    args = ap.parse_args()

    from fastapi.testclient import TestClient

    from samadapt.config.run_config import load_config
    from samadapt.serve import create_app, load_model

    image = args.image
    if image is None:
        from nilearn import datasets

        image = str(Path(tempfile.mkdtemp()) / "mni152.nii.gz")
        datasets.load_mni152_template(resolution=1).to_filename(image)
    model = load_model(config=load_config(args.config, []), device="cpu")
    with TestClient(create_app(model)) as client:
        desc = client.post(f"/api/sessions?name={Path(image).name}", content=Path(image).read_bytes()).json()
        sid, (z, h, w) = desc["id"], desc["shape"]

        def click(index: int, x: int) -> float:
            t0 = time.perf_counter()
            client.post(f"/api/sessions/{sid}/prompt", json={"axis": 0, "index": index, "x": x, "y": h // 2,
                                                             "positive": True}).raise_for_status()
            return time.perf_counter() - t0

        first = [click(index, w // 2) for index in (z // 2 - 1, z // 2)]  # unseen slices: encoder included
        later = [click(z // 2, w // 2 + i + 1) for i in range(args.clicks)]  # embedding of slice z // 2 reused
    info = model.info()
    f, m = statistics.median(first), statistics.median(later)
    print(f"{info['method']} on {info['backbone']} ({info['device']}, {os.environ.get('OMP_NUM_THREADS', 'all')} "
          f"threads), image {desc['shape']}: first click on a slice {f:.3f} s (n=2; encoder + automatic mask + "
          f"decoder); later clicks median {m:.3f} s (min {min(later):.3f}, max {max(later):.3f}, n={len(later)}); "
          f"later/first {m / f:.2f}; encoder runs {model.encoder_runs}; "
          f"load average {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
