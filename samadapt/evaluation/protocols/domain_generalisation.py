"""Single-source domain generalisation protocol (DeSAM's cross-site study): one trained run, several target domains.

:func:`evaluate_domain_generalisation` takes a run folder (or a checkpoint) trained on one *source* dataset and
scores it, unchanged, on every *target* dataset, writing one table with a row per target (and per inference mode
when ``modes`` is given). The source's own test split is the first row (``domain = source``) so that the drop from
the training domain can be read off the table. Metrics are 3D per case (Dice, IoU, HD95/NSD/ASSD in mm from each
case's spacing), then mean and standard deviation over the cases of the target, as DeSAM reports (mean over
patients of the unseen sites). No model selection happens here: the run's checkpoint (chosen on its validation
split) is used as is.

A target is a dataset folder (any format ``open_dataset`` reads), ``name=folder``, or the name of a builder in
:func:`target_builders` (built once under ``data_root``): the demo datasets (``mni152-brain``, ``nuclei``,
``invesalius-ct``, ...) and ``mni152-brain-2mm`` / ``mni152-brain-3mm``
(:func:`samadapt.data.demo_data.build_mni152_resolution`).

Label mapping: when the model is binary and a target has several foreground classes, the target's foreground is
``label > 0`` (recorded in the row as ``labels = any>0``); other class-count mismatches are an error.

What the offline targets are (no second real T1 subject installs offline): ``mni152-brain-2mm``/``-3mm`` are the
*same* MNI152 2009 template as the source, as nilearn resamples it to 2 or 3 mm; their test slab covers the same
physical z-range as the 1 mm test slab, so the shift is resolution/partial-volume (fewer, thicker, blurrier
slices), not anatomy or scanner. ``nuclei`` (fluorescence microscopy) and ``invesalius-ct`` (a head CT whose labels
are HU thresholds: soft tissue + bone, so with ``any>0`` the whole head) are different modalities *and* different
tasks: a brain-extraction model is not expected to segment them; they show what the method does far outside its
training domain.
"""

from __future__ import annotations

import math
import os
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from ...errors import ConfigError, InputError

TABLE_COLUMNS = ("target", "domain", "mode", "cases", "labels", "dice", "dice_std", "iou", "hd95", "nsd", "assd",
                 "predict_s")


# --- target datasets ---------------------------------------------------------------------------------------------
def target_builders() -> dict[str, Callable[..., Path]]:
    """Target names that :func:`evaluate_domain_generalisation` builds on demand (under ``data_root``)."""
    from ...data.demo_data import DEMO_DATASETS

    return dict(DEMO_DATASETS)


def resolve_target(spec: str, data_root: Path) -> tuple[str, Path]:
    """``name=path``, a dataset folder, or a :func:`target_builders` name -> (row name, dataset folder)."""
    name, _, path = spec.partition("=") if "=" in spec else ("", "", spec)
    if Path(path).exists():
        return name or Path(path).name, Path(path)
    builders = target_builders()
    if path in builders:
        return name or path, Path(builders[path](data_root / path))
    raise InputError(path, f"no such dataset folder, nor a known target ({', '.join(sorted(builders))})")


def site_targets(sites_root: str | os.PathLike, source: str | os.PathLike | None) -> list[str]:
    """The single-source protocol's targets: every prostate site folder under ``sites_root`` except ``source`` (the
    run's training site, matched by path), as ``name=folder`` specs named ``<letter> <folder>`` (e.g. ``B BMC``)."""
    from ...data.readers.prostate import prostate_sites

    here = Path(source).resolve() if source else None
    return [f"{letter} {folder.name}={folder}" for letter, folder in prostate_sites(sites_root).items()
            if folder.resolve() != here]


# --- the protocol --------------------------------------------------------------------------------------------------
def _case_ids(source: Any, which: str) -> list[str]:
    if which == "all":
        return list(source.case_ids)
    if which != "test":
        raise ConfigError(f"cases must be 'test' or 'all', got {which!r}")
    if source.split_file is not None:
        return list(source.make_split().test)
    return list(source.case_ids)  # a target without a split file: every labelled case is unseen


def gt_slices(pred: np.ndarray, gt: np.ndarray, axis: int, release_range: bool = False
              ) -> tuple[np.ndarray, np.ndarray]:
    """Keep only the slices along ``axis`` that contain ground truth (DeSAM's evaluation protocol).

    pred, gt: Z x Y x X (2D inputs are returned unchanged). ``release_range``: as the release's preprocessing, only
    GT slices with ``z_min <= z < z_max`` (the last slice holding ground truth is left out).
    """
    if gt.ndim != 3:
        return pred, gt
    other = tuple(a for a in range(3) if a != axis)
    keep = np.flatnonzero(gt.any(axis=other))
    if release_range and len(keep):
        keep = keep[keep < keep.max()]
    return np.take(pred, keep, axis=axis), np.take(gt, keep, axis=axis)


def zero_border(pred: np.ndarray, axis: int, px: float, reference: int | None = 256) -> np.ndarray:
    """A copy of ``pred`` with ``px`` pixels along each in-plane edge of every slice (normal ``axis``) set to 0.

    The release zeroes 50 px of its 256 x 256 slices; with ``reference`` the width scales to the slice size
    (``round(px * side / reference)`` per in-plane axis), ``reference=None`` takes ``px`` as is. 2D inputs
    (Y x X) are one slice.
    """
    out = np.array(pred, copy=True)
    planes = [a for a in range(out.ndim) if out.ndim == 2 or a != axis]
    for a in planes:
        side = out.shape[a]
        k = min(side, int(round(px * side / reference)) if reference else int(px))
        if k <= 0:
            continue
        index = [slice(None)] * out.ndim
        index[a] = slice(0, k)
        out[tuple(index)] = 0
        index[a] = slice(side - k, side)
        out[tuple(index)] = 0
    return out


def _json_value(v: Any) -> Any:
    return None if isinstance(v, float) and not math.isfinite(v) else v


def _mean_std(values: list[float]) -> tuple[float, float]:
    finite = [v for v in values if not math.isnan(v)]
    if not finite:
        return float("nan"), float("nan")
    return float(np.mean(finite)), float(np.std(finite))


def evaluate_domain_generalisation(
    run_dir_or_checkpoint: str | os.PathLike,
    target_datasets: Sequence[str],
    out_dir: str | os.PathLike | None = None,
    *,
    include_source: bool = True,
    cases: str = "test",
    modes: Sequence[str] | None = None,
    gt_slices_only: bool = False,
    release_gt_range: bool = False,
    border_px: float = 0,
    border_reference: int | None = 256,
    sites: str | os.PathLike | None = None,
    data_root: str | os.PathLike | None = None,
    device: str = "auto",
    batch_size: int = 8,
    use_cache: bool = True,
    cache_dir: str | os.PathLike | None = None,
    nsd_tolerance_mm: float = 1.0,
    clicks: int = 0,
    progress: Callable[[str], None] | None = None,
) -> list[dict[str, Any]]:
    """Score one trained run on its source test split and on each target dataset; one row per (target, mode).

    Args:
        run_dir_or_checkpoint: a ``samadapt train`` run folder (its best checkpoint, else its last) or a
            ``.safetensors``.
        target_datasets: dataset folders, ``name=folder`` or :func:`target_builders` names.
        out_dir: if given, ``dg_table.{csv,json,md}`` and ``dg_per_case.csv`` are written there.
        include_source: first row(s) = the run's own test split (``domain = source``).
        cases: ``test`` (a target's ``splits.json`` test cases, or all its cases when it has none) or ``all``.
        modes: inference modes to compare (sets the method's ``mode`` option, e.g. DeSAM ``["grid", "box"]``);
            default: the trained configuration only.
        gt_slices_only: score only the slices that contain ground truth (DeSAM's prostate protocol).
        release_gt_range: with ``gt_slices_only``, leave out the last GT slice of each case as the release does
            (its slices are ``z_min <= z < z_max``).
        border_px / border_reference: zero the prediction within ``border_px`` pixels of each in-plane edge of
            every slice before scoring (the release: 50 on its 256 x 256 slices, ``edge_set_zero``), the width
            scaled to the slice size by ``border_reference`` (None: pixels as is). The ground truth is unchanged.
        sites: a multi-site prostate root (:mod:`samadapt.data.readers.prostate`): every site except the run's
            source site is added as a target, one row per site (DeSAM's single-source protocol). A source trained
            with ``test_fraction 0`` (the 90/10 split) has no source row.
        data_root: where named targets are built (default ``out_dir/data``, else ``./dg_data``).
        use_cache / cache_dir: read/write encoder outputs in the embedding cache (default: the run's cache dir).
        clicks: predict after this many corrective clicks per slice simulated from the ground truth (interactive
            methods, ``Predictor.use_clicks``); 0 = the automatic prediction.

    Returns:
        The table rows (dicts with :data:`TABLE_COLUMNS`; metric values are means over cases, NaN when undefined).
    """
    from ...data.readers import open_dataset
    from ...engine.rundir import checkpoint_config, resolve_checkpoint
    from ...engine.predict import Predictor
    from ..metrics import compute_metrics

    say = progress or (lambda _msg: None)
    if release_gt_range and not gt_slices_only:
        raise ConfigError("release_gt_range applies to the GT slices; set gt_slices_only too")
    if border_px < 0:
        raise ConfigError(f"border_px must be >= 0, got {border_px}")
    checkpoint = resolve_checkpoint(run_dir_or_checkpoint, or_last=True)
    config, manifest = checkpoint_config(checkpoint)
    if cache_dir is not None:
        config.data.cache_dir = str(cache_dir)
    num_classes = int(manifest["method"]["num_classes"])
    predictor = Predictor.from_config(config, num_classes, checkpoint, device, batch_size, use_cache)
    predictor.use_clicks(clicks)
    method = predictor.method
    if modes and not hasattr(method.config, "mode"):
        raise ConfigError(f"method {method.name!r} has no 'mode' option; leave modes unset")
    trained_mode = getattr(method.config, "mode", "")
    root = Path(data_root) if data_root else (Path(out_dir) / "data" if out_dir else Path("dg_data"))

    targets: list[tuple[str, str, Any, list[str]]] = []  # (name, domain, source, case ids)
    if include_source:
        if not config.data.path:
            raise ConfigError(f"{checkpoint}: the run's config has no data.path; pass include_source=False")
        src = open_dataset(config.data.path, config.data.format)
        split = manifest.get("data", {}).get("split", {}) if isinstance(manifest.get("data"), dict) else {}
        ids = list(split.get("test") or []) or list(src.make_split(
            val_fraction=config.data.val_fraction, test_fraction=config.data.test_fraction,
            seed=config.data.split_seed).test)
        if cases == "all":
            ids = list(src.case_ids)
        if ids or sites is None:
            targets.append((f"{Path(config.data.path).name} (source)", "source", src, ids))
    if sites is not None:
        target_datasets = list(target_datasets) + site_targets(sites, config.data.path or None)
    for spec in target_datasets:
        name, path = resolve_target(spec, root)
        src = open_dataset(path)
        targets.append((name, "target", src, _case_ids(src, cases)))

    rows: list[dict[str, Any]] = []
    per_case: list[dict[str, Any]] = []
    try:
        for mode in (list(modes) if modes else [trained_mode]):
            if modes:
                method.config.mode = mode
            for name, domain, src, ids in targets:
                if not ids:
                    raise InputError(src.root, "no labelled case to evaluate")
                if num_classes == 1 or src.num_classes == num_classes:
                    mapping = "any>0" if (num_classes == 1 and src.num_classes > 1) else "same"
                else:
                    raise ConfigError(f"target {name}: {src.num_classes} classes, the model has {num_classes}")
                classes = [1] if mapping == "any>0" else list(range(1, num_classes + 1))
                scores: dict[str, list[float]] = {m: [] for m in ("dice", "iou", "hd95", "nsd", "assd")}
                t0 = time.time()
                for cid in ids:
                    case = src.load(cid)
                    if case.label is None:
                        raise InputError(cid, "target case has no label")
                    say(f"{name} [{mode or 'default'}]: predicting {cid}")
                    pred = predictor.predict_case(case)
                    gt = np.asarray(case.label)
                    if mapping == "any>0":
                        pred, gt = (pred > 0).astype(np.uint8), (gt > 0).astype(np.uint8)
                    if border_px:
                        pred = zero_border(pred, config.data.axis, border_px, border_reference)
                    if gt_slices_only:
                        pred, gt = gt_slices(pred, gt, config.data.axis, release_gt_range)
                    result = compute_metrics(pred, gt, classes, case.spacing, nsd_tolerance_mm=nsd_tolerance_mm)
                    for c in classes:
                        per_case.append({"target": name, "mode": mode, "case": cid, "class": c, **result[c]})
                    for m in scores:  # foreground mean over classes per case
                        vals = [result[c][m] for c in classes if not math.isnan(result[c][m])]
                        scores[m].append(float(np.mean(vals)) if vals else float("nan"))
                row: dict[str, Any] = {"target": name, "domain": domain, "mode": mode, "cases": len(ids),
                                       "labels": mapping}
                for m, vals in scores.items():
                    row[m], std = _mean_std(vals)
                    if m == "dice":
                        row["dice_std"] = std
                row["predict_s"] = round(time.time() - t0, 1)
                rows.append(row)
    finally:
        if modes and hasattr(method.config, "mode"):
            method.config.mode = trained_mode
    if out_dir is not None:
        write_dg_table(rows, per_case, Path(out_dir), checkpoint)
    return rows


def write_dg_table(rows: Sequence[dict], per_case: Sequence[dict], out: Path, checkpoint: Path | None = None) -> None:
    """``dg_table.{csv,json,md}`` (one row per target and mode) and ``dg_per_case.csv`` in ``out`` (atomic)."""
    import csv
    import io

    from ...io_utils import atomic_write_json, atomic_write_text
    from ..report import metrics_table

    out.mkdir(parents=True, exist_ok=True)
    for name, table, fields in (("dg_table.csv", rows, list(TABLE_COLUMNS)),
                                ("dg_per_case.csv", per_case,
                                 ["target", "mode", "case", "class", "dice", "iou", "hd95", "nsd", "assd"])):
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=fields, extrasaction="ignore", lineterminator="\n")
        writer.writeheader()
        writer.writerows(table)
        atomic_write_text(out / name, buf.getvalue())
    atomic_write_json(out / "dg_table.json", {"checkpoint": str(checkpoint) if checkpoint else None,
                                              "rows": [{k: _json_value(r.get(k)) for k in TABLE_COLUMNS}
                                                       for r in rows]})
    header = f"Domain generalisation of `{checkpoint}`\n\n" if checkpoint else ""
    atomic_write_text(out / "dg_table.md", header + metrics_table(rows, TABLE_COLUMNS) + "\n")


__all__ = ["TABLE_COLUMNS", "evaluate_domain_generalisation", "gt_slices", "resolve_target", "site_targets",
           "target_builders", "write_dg_table", "zero_border"]
