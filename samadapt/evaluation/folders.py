"""Compare a folder of predicted label maps with a folder of ground-truth label maps.

Files are paired by name stem (``case.nii.gz`` with ``case.nii.gz``, ``x.png`` with ``x.png``; the extensions may
differ, e.g. ``case.nii`` with ``case.nii.gz``). Raster masks holding only {0, 255} are read as {0, 1} (the 2D-folder
convention of :mod:`samadapt.data`). Both sides are read with SimpleITK (NIfTI, NRRD, MHA/MHD, PNG, TIF,
BMP). The voxel spacing comes from the ground-truth image, reversed to numpy axis order. Raster pictures (PNG, TIF,
BMP) carry no physical voxel spacing (at most a print resolution such as 72 dpi), so their spacing is taken as 1 and
their distances are in pixels; the summary counts such cases. Metrics and their empty-mask conventions are those of
:mod:`samadapt.evaluation.metrics`.

Outputs (each written to a temporary name, then renamed; nothing is written before every case has been scored):

- ``per_case.csv``: one row per case and class: ``case, class, dice, iou, hd95, hd95_vox, nsd, assd`` by default
  (HD95 in the run's units, mm unless ``units="voxel"``, and always in voxels; add ``hd95_medpy``/``hd95_medpy_vox``
  for the pooled MedPy definition of SAMed/H-SAM); an undefined distance (exactly one of the two masks empty) is
  written ``nan``.
- ``summary.json``: :func:`samadapt.evaluation.metrics.summarize` of those rows (mean/std/n/missing per class and for the
  foreground average) plus the settings (units, NSD tolerance, classes) and any warnings; NaN is written ``null``.
"""

from __future__ import annotations

import csv
import io
import math
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from samadapt.errors import InputError
from samadapt.io_utils import atomic_path, atomic_write_json
from samadapt.evaluation.metrics import DISTANCE_METRICS, VOXEL_METRICS, compute_metrics, rows_from_result, summarize

__all__ = ["EVALUATION_METRICS", "LABEL_EXTENSIONS", "evaluate_folders", "print_summary", "read_label_map",
           "to_release_grid"]

EVALUATION_METRICS: tuple[str, ...] = ("dice", "iou", "hd95", "hd95_vox", "nsd", "assd")
"""What :func:`evaluate_folders` scores by default: HD95 both in the run's units and in voxels (published tables)."""

LABEL_EXTENSIONS: tuple[str, ...] = (
    ".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd", ".png", ".tif", ".tiff", ".bmp",
)
"""Label-map files that :func:`evaluate_folders` pairs; other files in the folders are ignored."""

_RASTER = (".png", ".tif", ".tiff", ".bmp")


def _split_name(name: str) -> tuple[str, str] | None:
    """(stem, extension) for a label-map file name, None for any other file (and hidden files)."""
    if name.startswith("."):
        return None
    low = name.lower()
    for ext in LABEL_EXTENSIONS:
        if low.endswith(ext) and len(name) > len(ext):
            return name[: -len(ext)], ext
    return None


def _index_folder(folder: Path, role: str) -> dict[str, Path]:
    if not folder.is_dir():
        raise InputError(folder, f"{role} folder not found")
    found: dict[str, Path] = {}
    for entry in sorted(folder.iterdir()):
        if not entry.is_file():
            continue
        split = _split_name(entry.name)
        if split is None:
            continue
        stem = split[0]
        if stem in found:
            raise InputError(
                entry, f"two {role} files share the case name {stem!r}: {found[stem].name} and {entry.name}"
            )
        found[stem] = entry
    return found


def _nifti_truncation(path: str) -> str | None:
    """For an uncompressed ``.nii``: a message when the file is shorter than its header promises, else None.

    SimpleITK reads such a truncated file without complaint and fills the missing voxels with zeros.
    """
    try:
        with open(path, "rb") as f:
            header = f.read(544)
    except OSError:
        return None
    if len(header) < 348:
        return f"file of {len(header)} bytes is shorter than a NIfTI header"
    for order in ("<", ">"):
        size = int(np.frombuffer(header[:4], dtype=f"{order}i4")[0])
        if size == 348:  # NIfTI-1
            dims = np.frombuffer(header[40:56], dtype=f"{order}i2").astype(np.int64)
            bitpix = int(np.frombuffer(header[72:74], dtype=f"{order}i2")[0])
            offset = int(np.frombuffer(header[108:112], dtype=f"{order}f4")[0])
            break
        if size == 540 and len(header) >= 544:  # NIfTI-2
            dims = np.frombuffer(header[16:80], dtype=f"{order}i8")
            bitpix = int(np.frombuffer(header[14:16], dtype=f"{order}i2")[0])
            offset = int(np.frombuffer(header[168:176], dtype=f"{order}i8")[0])
            break
    else:
        return None
    ndim = int(dims[0])
    if not 1 <= ndim <= 7 or bitpix <= 0:
        return None
    expected = offset + int(np.prod(np.maximum(dims[1 : ndim + 1], 1))) * bitpix // 8
    actual = os.path.getsize(path)
    if actual < expected:
        return f"truncated file: {actual} bytes, its header promises {expected}"
    return None


def read_label_map(path: str | os.PathLike) -> tuple[np.ndarray, tuple[float, ...]]:
    """Read an integer label map and its spacing (numpy axis order) with SimpleITK.

    A raster picture (PNG/TIF/BMP) holding only the values {0, 255} is a binary mask in the 2D-folder convention
    and is read as {0, 1}, so that such ground truth and 0/1 predictions (or the reverse) compare as they should.
    Its spacing is returned as SimpleITK reports it; :func:`evaluate_folders` replaces a raster picture's by 1.

    Raises:
        InputError: naming the file when it cannot be read, has several differing channels (an RGB or palette
            picture rather than a label map), or holds values that are not whole numbers.
    """
    import SimpleITK as sitk

    path = str(path)
    if not os.path.isfile(path):
        raise InputError(path, "file not found")
    try:
        image = sitk.ReadImage(path)
    except RuntimeError as err:
        lines = [line.strip() for line in str(err).splitlines() if line.strip()]
        errors = [line for line in lines if "ERROR" in line]
        detail = (errors or lines or ["unknown error"])[-1][:300]
        raise InputError(path, f"cannot read image (unreadable, truncated or unsupported file): {detail}") from None
    if path.lower().endswith(".nii"):
        problem = _nifti_truncation(path)
        if problem:
            raise InputError(path, f"cannot read image ({problem})")
    arr = sitk.GetArrayFromImage(image)
    spacing = tuple(float(s) for s in reversed(image.GetSpacing()))
    if image.GetNumberOfComponentsPerPixel() > 1:
        first = arr[..., 0]
        if not all(np.array_equal(first, arr[..., k]) for k in range(1, arr.shape[-1])):
            raise InputError(
                path,
                f"expected a single-channel label map, got {arr.shape[-1]} differing channels (RGB or palette colours)",
            )
        arr = first
    if not (arr.dtype == bool or np.issubdtype(arr.dtype, np.integer)):
        if not np.all(np.isfinite(arr)) or not np.array_equal(arr, np.round(arr)):
            raise InputError(path, f"expected integer labels, got {arr.dtype} values that are not whole numbers")
        arr = arr.astype(np.int64)
    split = _split_name(os.path.basename(path))
    if split is not None and split[1] in _RASTER and arr.dtype != bool and arr.max(initial=0) == 255:
        if not np.any((arr != 0) & (arr != 255)):
            arr = (arr == 255).astype(np.uint8)  # the 2D-folder convention: a binary mask stored as {0, 255}
    return arr, spacing


def _json_safe(obj):
    """NaN/inf -> None so that summary.json is strict JSON."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    return obj


def to_release_grid(pred: np.ndarray, gt: np.ndarray, spacing: Sequence[float], size: int, path: Path
                    ) -> tuple[np.ndarray, np.ndarray, tuple[float, ...]]:
    """ProMISe's evaluation protocol: both 2D label maps (H x W) on a ``size x size`` grid.

    The prediction is resized nearest. Each ground-truth class is resized bilinearly (as a 0/1 map, no
    antialiasing) and kept where the result is > 0, which dilates it slightly (the release's quirk); where two
    classes touch the higher label wins. Returns (pred, gt, spacing scaled by H / size and W / size).
    Raises ``InputError`` naming ``path`` for a label map that is not 2D.
    """
    import torch
    import torch.nn.functional as F

    if gt.ndim != 2:
        raise InputError(path, f"evaluation on a {size} x {size} grid scores 2D pictures; this label map is "
                               f"{gt.ndim}D {tuple(gt.shape)}")
    if size < 1:
        raise InputError("grid", f"expected a positive size, got {size}")
    out_pred = F.interpolate(torch.from_numpy(pred.astype(np.int64))[None, None].float(), size=(size, size),
                             mode="nearest")[0, 0].numpy().astype(pred.dtype)
    out_gt = np.zeros((size, size), dtype=gt.dtype)
    for k in sorted(int(v) for v in np.unique(gt) if v != 0):
        mask = torch.from_numpy((gt == k).astype(np.float32))[None, None]
        resized = F.interpolate(mask, size=(size, size), mode="bilinear", align_corners=False)[0, 0].numpy()
        out_gt[resized > 0] = k
    scaled = (float(spacing[0]) * gt.shape[0] / size, float(spacing[1]) * gt.shape[1] / size)
    return out_pred, out_gt, scaled


def evaluate_folders(
    pred_dir: str | os.PathLike,
    gt_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    classes: Sequence[int] | None = None,
    nsd_tolerance_mm: float = 1.0,
    *,
    units: str = "mm",
    metrics: Sequence[str] = EVALUATION_METRICS,
    grid: int | None = None,
) -> dict:
    """Score every ground-truth file in ``gt_dir`` against the prediction of the same name stem in ``pred_dir``.

    Args:
        pred_dir: folder of predicted label maps.
        gt_dir: folder of ground-truth label maps; every one needs a prediction.
        out_dir: where ``per_case.csv`` and ``summary.json`` go (created if missing).
        classes: labels to score; default: every non-zero label found in the ground truth.
        nsd_tolerance_mm: NSD tolerance in mm (in voxels with ``units="voxel"``).
        units: ``"mm"`` (spacing of each ground-truth image) or ``"voxel"`` (SAMed/H-SAM compatibility).
        metrics: names from :data:`samadapt.evaluation.metrics.ALL_METRICS` (default :data:`EVALUATION_METRICS`).
        grid: score 2D pictures on a ``grid x grid`` copy (ProMISe's release: 256), see :func:`to_release_grid`;
            None scores them at their own size.

    Returns:
        The summary also written to ``summary.json`` (NaN as ``None``).

    Raises:
        InputError: a folder is missing or holds no label map; a ground-truth file has no prediction; a file cannot
            be read; a prediction's size differs from its ground truth's (the message names both files).
    """
    if units not in ("mm", "voxel"):
        raise InputError("units", f"expected 'mm' or 'voxel', got {units!r}")
    pred_dir, gt_dir, out_dir = Path(pred_dir), Path(gt_dir), Path(out_dir)
    gts = _index_folder(gt_dir, "ground-truth")
    preds = _index_folder(pred_dir, "prediction")
    if not gts:
        raise InputError(
            gt_dir, f"no ground-truth label maps found (expected files ending in {', '.join(LABEL_EXTENSIONS)})"
        )
    missing = [stem for stem in gts if stem not in preds]
    if missing:
        listed = ", ".join(gts[s].name for s in missing[:5])
        if len(missing) > 5:
            listed += f" and {len(missing) - 5} more"
        raise InputError(
            gts[missing[0]],
            f"no prediction in {pred_dir} for {len(missing)} ground-truth file(s): {listed} "
            f"(expected e.g. {pred_dir / gts[missing[0]].name})",
        )
    unmatched = sorted(stem for stem in preds if stem not in gts)

    if classes is None:
        labels: set[int] = set()
        for gt_path in gts.values():
            labels.update(int(v) for v in np.unique(read_label_map(gt_path)[0]))
        classes = sorted(v for v in labels if v != 0)
        if not classes:
            raise InputError(gt_dir, "no foreground label in any ground-truth file; pass classes=... to score anyway")
    classes = [int(c) for c in classes]

    rows: list[dict] = []
    warnings_out: list[str] = []
    if unmatched:
        listed = ", ".join(preds[s].name for s in unmatched[:5]) + (f" and {len(unmatched) - 5} more"
                                                                   if len(unmatched) > 5 else "")
        warnings_out.append(f"{len(unmatched)} prediction file(s) in {pred_dir} have no ground truth and are not "
                            f"scored: {listed}")
    raster_cases = 0
    for stem, gt_path in gts.items():
        pred_path = preds[stem]
        gt, spacing = read_label_map(gt_path)
        pred, pred_spacing = read_label_map(pred_path)
        if pred.shape != gt.shape:
            raise InputError(
                pred_path,
                f"size {tuple(pred.shape)} differs from ground truth {gt_path} size {tuple(gt.shape)} (numpy order)",
            )
        raster = _split_name(gt_path.name)[1] in _RASTER or _split_name(pred_path.name)[1] in _RASTER
        if grid is not None:
            pred, gt, spacing = to_release_grid(pred, gt, spacing, grid, gt_path)
        if units == "mm" and not raster and not np.allclose(pred_spacing, spacing, rtol=1e-3, atol=1e-4):
            warnings_out.append(
                f"{pred_path.name}: spacing {pred_spacing} differs from ground truth {spacing}; "
                "the ground truth's is used"
            )
        extra = sorted(set(int(v) for v in np.unique(pred)) - set(classes) - {0})
        if extra:
            warnings_out.append(f"{pred_path.name}: labels {extra} are not among the scored classes {classes}")
        if _split_name(gt_path.name)[1] in _RASTER:
            raster_cases += 1
            spacing = (1.0,) * gt.ndim  # a print resolution (dpi), if any, is not a voxel size
        result = compute_metrics(
            pred,
            gt,
            classes,
            spacing if units == "mm" else None,
            nsd_tolerance_mm=nsd_tolerance_mm,
            metrics=metrics,
            units=units,
        )
        rows.extend(rows_from_result(stem, result))

    summary = summarize(rows)
    summary.update(
        {
            "units": units,
            "grid": grid,
            "nsd_tolerance": float(nsd_tolerance_mm),
            "raster_cases_without_spacing": raster_cases if units == "mm" else 0,
            "unmatched_predictions": unmatched,
            "warnings": warnings_out,
            "pred_dir": str(pred_dir),
            "gt_dir": str(gt_dir),
        }
    )
    summary["classes"] = classes
    summary = _json_safe(summary)

    buf = io.StringIO()
    names = list(summary["metrics"])
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["case", "class", *names])
    for r in rows:
        writer.writerow([r["case"], r["class"], *(repr(float(r[m])) for m in names)])
    out_dir.mkdir(parents=True, exist_ok=True)
    with atomic_path(out_dir / "per_case.csv") as tmp:
        tmp.write_text(buf.getvalue())
    atomic_write_json(out_dir / "summary.json", summary)
    return summary


def _fmt(stat: dict, metric: str) -> str:
    mean, std, missing = stat.get("mean"), stat.get("std"), stat.get("missing", 0)
    if mean is None or (isinstance(mean, float) and math.isnan(mean)):
        text = "n/a"
    else:
        digits = 2 if metric in DISTANCE_METRICS else 3
        text = f"{mean:.{digits}f}±{std:.{digits}f}"
    if missing:
        text += f" ({missing} missing)"
    return text


def print_summary(summary: dict, console=None) -> None:
    """Print a summary from :func:`evaluate_folders` as a rich table: one row per class and the foreground mean."""
    from rich import box
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    metrics = list(summary["metrics"])
    units = summary.get("units", "mm")
    dist_unit = "vox" if units == "voxel" else "mm"
    title = f"Evaluation: {summary.get('num_cases', '?')} cases"
    if "nsd" in metrics and summary.get("nsd_tolerance") is not None:
        title += f", NSD at {summary['nsd_tolerance']:g} {dist_unit}"
    table = Table(title=title, box=box.SIMPLE_HEAVY, caption="mean±std over cases")
    table.add_column("class", justify="right")
    for m in metrics:
        header = {"dice": "Dice", "iou": "IoU"}.get(m, m.upper().replace("_VOX", "").replace("_MEDPY", " MedPy"))
        unit = "vox" if m in VOXEL_METRICS else dist_unit
        table.add_column(f"{header} ({unit})" if m in DISTANCE_METRICS else header, justify="right")
    for c, stats in summary["per_class"].items():
        table.add_row(str(c), *(_fmt(stats[m], m) for m in metrics))
    table.add_row("foreground", *(_fmt(summary["foreground"][m], m) for m in metrics), style="bold")
    console.print(table)
    if summary.get("raster_cases_without_spacing"):
        console.print(
            f"{summary['raster_cases_without_spacing']} case(s) are raster pictures without physical spacing: "
            "their distances are in pixels."
        )
    for w in summary.get("warnings", []):
        console.print(f"[yellow]warning:[/yellow] {w}")
