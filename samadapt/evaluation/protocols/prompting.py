"""ProMISe on the MNI152 test slab: automatic (APM) points, ground-truth points, and simulated user corrections.

For each trained ProMISe run given to :func:`evaluate_prompting` as ``NAME -> RUN_DIR`` (its best checkpoint is
used, chosen on the validation slab), on every slice of the dataset's test case(s), and for a K-class run (one
ProMISe head per class) for each class k, its head scored against ``label == k``:

1. the run as trained (APM points; ground-truth points for an ``ips_gt`` run) -> 3D Dice, and where the points
   went on the foreground slices (:func:`point_facts`: do they follow the image, sit on the border, hit the
   foreground?);
2. for APM runs, the same model given ground-truth points instead (``eval_points=gt``: the paper's APM_IPS_GT);
3. the promptability claim: slices whose automatic 2D Dice is below ``bad`` get up to ``clicks`` simulated user
   clicks, added to the APM points (``user_points=extend``). Each click goes to the interior of the largest error
   region of the current prediction (the pixel farthest from its border): positive on a missed region, negative on
   a false one (``samadapt.data.clicks`` policy ``largest_region``); the prediction is recomputed after every
   click. Reported: mean Dice of those slices after 0..k clicks and the 3D Dice with the corrected slices.

Writes ``OUT/promise_prompting.md`` / ``.json`` and ``OUT/points_*.png`` (the points the model used, drawn on bad
slices before and after the clicks), each atomically. Encoder outputs come from the embedding cache (``cache``).

    samadapt evaluate prompting --data DATASET --cache CACHE_DIR --out OUT \\
        --run apm_ips=runs/promise --run apm=runs/promise_apm --run ips_gt=runs/promise_ips_gt
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import replace
from pathlib import Path
from typing import Callable, Mapping

import numpy as np
import torch

from samadapt.data.clicks import next_click
from samadapt.data.readers import open_dataset
from samadapt.data.slices import collate, reassemble, volume_slices
from samadapt.engine.device import to_device
from samadapt.engine.predict import Predictor
from samadapt.engine.rundir import checkpoint_config, resolve_checkpoint
from samadapt.errors import ConfigError
from samadapt.evaluation.metrics import compute_metrics
from samadapt.evaluation.point_plots import plot_points
from samadapt.io_utils import atomic_write_text
from samadapt.methods.one_vs_rest import OneVsRest
from samadapt.overlap import dice


def point_facts(points: torch.Tensor, labels: torch.Tensor, truth: torch.Tensor, size: int) -> dict[str, float | None]:
    """Where a model put its prompts on B slices: ``points`` B x N x 2 (x, y in the S x S frame), ``labels`` B x N
    (1 positive, 0 negative, -1 padding), ``truth`` B x S x S (foreground > 0), ``size`` S.

    ``spread_px``: per point (padding left out), the standard deviation of its position over the slices, averaged
    (0: one fixed pattern for every image); ``border``: fraction of points within 2 % of S of an edge;
    ``positive_on_fg`` / ``negative_on_fg``: fraction of the positive / negative points that fall on foreground
    (None: no such points)."""
    real = labels >= 0
    xi = points[..., 0].long().clamp(0, size - 1)
    yi = points[..., 1].long().clamp(0, size - 1)
    on_fg = torch.stack([truth[b, yi[b], xi[b]] > 0 for b in range(len(truth))])
    margin = 0.02 * size
    border = ((points < margin) | (points > size - margin)).any(-1)

    def fraction(hit: torch.Tensor, where: torch.Tensor) -> float | None:
        return round(float(hit[where].float().mean()), 3) if bool(where.any()) else None

    always = real.all(dim=0)  # points that are real on every slice (not padding)
    spread = points.float().std(dim=0).norm(dim=-1)[always].mean() if len(points) > 1 and always.any() else 0.0
    return {"spread_px": round(float(spread), 2), "border": fraction(border, real),
            "positive_on_fg": fraction(on_fg, labels == 1), "negative_on_fg": fraction(on_fg, labels == 0)}


class Runner:
    """Predicts the slices of one case with one ProMISe model (the predictor's, or one of its one-vs-rest heads),
    optionally with extra user points per slice."""

    def __init__(self, predictor: Predictor, method, case, batch_size: int = 8):
        self.p = predictor
        self.method = method
        self.case = case
        self.items = volume_slices(case, predictor.axis, self.method.input_size, predictor.intensity,
                                   predictor.geometry)
        self.n = len(self.items)
        self.batch_size = batch_size
        self._features: dict[int, object] = {}

    def _batch(self, idx: list[int], points: dict[int, list] | None = None) -> dict:
        batch = collate([self.items[i] for i in idx])
        if self.p.feature_source is not None:
            batch["features"] = self.p.feature_source(batch)
        if points:
            n = max(len(points.get(i, [])) for i in idx)
            coords = torch.zeros(len(idx), n, 2)
            labels = -torch.ones(len(idx), n, dtype=torch.long)  # -1: padding (SAM's not-a-point)
            for r, i in enumerate(idx):
                for c, (x, y, lab) in enumerate(points.get(i, [])):
                    coords[r, c] = torch.tensor([x, y])
                    labels[r, c] = lab
            batch["points"], batch["point_labels"] = coords, labels
        return to_device(batch, self.p.device)

    @torch.inference_mode()
    def predict(self, idx: list[int], points: dict[int, list] | None = None):
        """Probabilities (list of 2 x S x S), the points used (list of N x 2, N) and the labels S x S."""
        probs, used, labels = [], [], []
        for start in range(0, len(idx), self.batch_size):
            part = idx[start:start + self.batch_size]
            batch = self._batch(part, points)
            probs.extend(self.method.predict(batch).float().cpu())
            used.extend(zip(self.method.last_points.cpu(), self.method.last_point_labels.cpu()))
            labels.extend(batch["label"].cpu())
        return probs, used, labels

    def dice3d(self, probs: list) -> float:
        pred = reassemble(probs, self.p.axis, self.case, geometry=self.p.geometry)
        return float(compute_metrics(pred, self.case.label, classes=[1], spacing=self.case.spacing,
                                     metrics=("dice",))[1]["dice"])


def evaluate_run(name: str, run: Path, case, out: Path, *, cache: str | os.PathLike | None = None, bad: float = 0.8,
                 clicks: int = 3, batch_size: int = 8) -> list[dict]:
    """The rows of one promise run on one case (see the module docstring); plots into ``out``."""
    ckpt = resolve_checkpoint(run)
    predictor = Predictor.from_checkpoint(ckpt, device="cpu", use_cache=True)
    if cache:  # the run's config names its own cache folder; use the shared one given here
        from samadapt.engine.run import feature_source

        config, _ = checkpoint_config(ckpt)
        config.data.cache_dir = str(cache)
        predictor.feature_source = feature_source(predictor.method.backbone, predictor.method, config.data,
                                                  predictor.device)
    if predictor.method.name != "promise":
        raise ConfigError(f"{run}: method {predictor.method.name!r}, expected promise")
    if not isinstance(predictor.method, OneVsRest):
        return _study(name, predictor, predictor.method, case, out, f"points_{name}", bad, clicks, batch_size)
    rows = []
    for k, head in enumerate(predictor.method.heads, start=1):
        own = replace(case, label=(case.label == k).astype(case.label.dtype))
        for row in _study(name, predictor, head, own, out, f"points_{name}_class{k}", bad, clicks, batch_size):
            rows.append(dict(row, **{"class": k}))
    return rows


def _study(name: str, predictor: Predictor, method, case, out: Path, plot_stem: str, bad: float, clicks: int,
           batch_size: int) -> list[dict]:
    """The rows of one binary ProMISe model (``method``) on one case with a binary label; plots ``plot_stem_*``."""
    runner = Runner(predictor, method, case, batch_size)
    all_idx = list(range(runner.n))
    rows = []

    t = time.time()
    probs, used, labels = runner.predict(all_idx)
    auto_s = time.time() - t
    source = method.last_point_source
    fg_idx = [i for i in all_idx if bool(labels[i].any())]
    facts = point_facts(torch.stack([used[i][0] for i in fg_idx]), torch.stack([used[i][1] for i in fg_idx]),
                        torch.stack([labels[i] for i in fg_idx]), method.input_size) if fg_idx else {}
    rows.append({"run": name, "mode": method.config.mode, "points": source, "dice3d": runner.dice3d(probs),
                 "predict_s_per_slice": round(auto_s / runner.n, 3), "point_facts": facts})
    if method.config.mode == "ips_gt":
        return rows

    method.config.eval_points = "gt"
    gt_probs, _, _ = runner.predict(all_idx)
    rows.append({"run": name, "mode": method.config.mode, "points": "gt (eval_points=gt)",
                 "dice3d": runner.dice3d(gt_probs)})
    method.config.eval_points = "apm"

    # Promptability: simulated user clicks on the slices the automatic result gets wrong.
    method.config.user_points = "extend"
    gts = [lab.numpy() > 0 for lab in labels]
    preds = [p[1].numpy() > 0.5 for p in probs]
    per_slice = [dice(p, g) for p, g in zip(preds, gts)]
    bad_idx = [i for i in fg_idx if per_slice[i] < bad]
    curve = [float(np.mean([per_slice[i] for i in bad_idx])) if bad_idx else float("nan")]
    user_clicks: dict[int, list] = {i: [] for i in bad_idx}
    corrected = list(probs)
    current = {i: preds[i] for i in bad_idx}
    last_used = {}
    for _ in range(clicks if bad_idx else 0):
        for i in bad_idx:
            c = next_click(current[i], gts[i], "largest_region")
            if c is not None:
                user_clicks[i].append(c)
        new_probs, new_used, _ = runner.predict(bad_idx, user_clicks)
        for i, p, u in zip(bad_idx, new_probs, new_used):
            corrected[i] = p
            current[i] = p[1].numpy() > 0.5
            last_used[i] = u
        curve.append(float(np.mean([dice(current[i], gts[i]) for i in bad_idx])))
    method.config.user_points = "replace"
    row = {"run": name, "mode": method.config.mode, "points": f"apm + {clicks} user clicks on bad slices",
           "dice3d": runner.dice3d(corrected), "fg_slices": len(fg_idx), "bad_slices": len(bad_idx),
           "bad_dice_by_clicks": [round(v, 4) for v in curve],
           "fg_slice_dice_auto": round(float(np.mean([per_slice[i] for i in fg_idx])), 4)}
    rows.append(row)

    if bad_idx and clicks:  # draw four bad slices spread over the slab: automatic points, then after the clicks
        worst = sorted({bad_idx[int(j)] for j in np.linspace(0, len(bad_idx) - 1, 4)})
        images = torch.stack([runner.items[i]["image"] for i in worst])
        truth = torch.stack([torch.from_numpy(gts[i]) for i in worst])
        before_pts = [used[i] for i in worst]
        after_pts = [last_used[i] for i in worst]
        for tag, pts, masks, scores in (
            ("auto", before_pts, [preds[i] for i in worst], [per_slice[i] for i in worst]),
            ("clicks", after_pts, [current[i] for i in worst], [dice(current[i], gts[i]) for i in worst]),
        ):
            n = max(p[0].shape[0] for p in pts)
            coords = torch.zeros(len(worst), n, 2)
            labs = -torch.ones(len(worst), n, dtype=torch.long)
            for r, (c, lab) in enumerate(pts):
                coords[r, :c.shape[0]], labs[r, :c.shape[0]] = c, lab
            plot_points(images, coords, labs, out / f"{plot_stem}_{tag}.png",
                        masks=torch.from_numpy(np.stack(masks)), truth=truth, user_from=method.config.num_points,
                        titles=[f"slice {i}: Dice {d:.2f}" for i, d in zip(worst, scores)])
    return rows


def prompting_markdown(rows: list[dict], bad: float = 0.8, clicks: int = 3) -> str:
    """The report table of :func:`evaluate_prompting`'s rows (``bad`` and ``clicks`` as it was called with)."""
    lines = ["| run | class | mode | points | 3D Dice | notes |", "|---|---|---|---|---|---|"]
    for r in rows:
        notes = ""
        if r.get("point_facts"):
            f = r["point_facts"]
            notes = (f"points on the foreground slices: spread {f['spread_px']} px over slices, {f['border']} on "
                     f"the border, {f['positive_on_fg']} of positives / {f['negative_on_fg']} of negatives on "
                     "foreground")
        if "bad_slices" in r:
            notes = (f"{r['bad_slices']}/{r['fg_slices']} foreground slices below {bad} 2D Dice; their mean "
                     f"Dice by clicks 0..{clicks}: {r['bad_dice_by_clicks']}")
        lines.append(f"| {r['run']} | {r.get('class', 1)} | {r['mode']} | {r['points']} | {r['dice3d']:.4f} "
                     f"| {notes} |")
    return "\n".join(lines) + "\n"


def evaluate_prompting(data: str | os.PathLike, runs: Mapping[str, str | os.PathLike], out: str | os.PathLike, *,
                       cache: str | os.PathLike | None = None, bad: float = 0.8, clicks: int = 3, batch_size: int = 8,
                       progress: Callable[[str], None] | None = None) -> list[dict]:
    """The prompting study of every promise run in ``runs`` ({name: run folder}) on ``data``'s test cases.

    Rows (one dict each, with ``run``, ``mode``, ``points``, ``dice3d``, ``case``, and ``class`` for a K-class run,
    whose rows repeat per class): the run as trained (with ``point_facts``, :func:`point_facts` on the foreground
    slices); for APM runs
    the same model with ground-truth points, then the APM points plus up to ``clicks`` simulated user clicks on the
    slices whose 2D Dice is below ``bad`` (``bad_slices``, ``fg_slices``, ``bad_dice_by_clicks``: the bad slices'
    mean Dice after 0..``clicks`` clicks, ``fg_slice_dice_auto``). Writes ``out/promise_prompting.json`` (the
    rows), ``out/promise_prompting.md`` (:func:`prompting_markdown`) and
    ``out/points_<run>[_class<k>]_{auto,clicks}.png``;
    ``progress`` gets each row as a JSON line as soon as it is computed.
    """
    if not runs:
        raise ConfigError("the prompting study needs at least one promise run")
    if clicks < 0 or batch_size < 1:
        raise ConfigError(f"clicks must be >= 0 and batch_size >= 1, got {clicks} and {batch_size}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    source = open_dataset(data)
    rows = []
    for name, run in runs.items():
        for case_id in source.make_split().test:
            for row in evaluate_run(name, Path(run), source.load(case_id), out, cache=cache, bad=bad, clicks=clicks,
                                    batch_size=batch_size):
                row["case"] = case_id
                rows.append(row)
                if progress is not None:
                    progress(json.dumps(row))
    atomic_write_text(out / "promise_prompting.json", json.dumps(rows, indent=1))
    atomic_write_text(out / "promise_prompting.md", prompting_markdown(rows, bad, clicks))
    return rows
