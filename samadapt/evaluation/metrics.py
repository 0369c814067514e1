"""Segmentation metrics with written conventions: Dice, IoU, HD95, NSD and ASSD.

All functions take integer label maps (0 = background) as numpy arrays, 2D (H x W) or 3D (D x H x W), and score
each requested class as a binary mask ``label == c``.

Units
-----
Distances (HD95, ASSD) and the NSD tolerance are in **millimetres**, computed with the voxel spacing given in
numpy axis order (for a SimpleITK image, ``image.GetSpacing()[::-1]``). Passing ``spacing=None`` or
``units="voxel"`` gives the voxel-unit variant (spacing 1 on every axis) that SAMed and H-SAM report; use it only
to compare with those papers. Axes of length 1 are dropped before scoring (a 2D slice stored as a 1 x H x W volume
is scored as 2D; otherwise every one of its voxels would be a surface voxel).

Surface definitions
-------------------
- **Surfaces** (HD95 and ASSD): the surface of a mask is its set of boundary voxels, i.e. foreground voxels with at
  least one face-neighbour (4-connectivity in 2D, 6 in 3D) in the background; the image border counts as background
  (MedPy's and MONAI's definition). Distances are Euclidean between voxel centres, scaled by the spacing. Let
  ``d(pred -> gt)`` be the distance of each pred surface voxel to the nearest gt surface voxel, and the reverse.
- **HD95** has two definitions in the literature, and they differ (by ~0.1-0.3 mm on small anisotropic masks):

  - ``hd95`` (samadapt's default, MONAI's ``compute_hausdorff_distance(percentile=95)``): the larger of the two
    directed 95th percentiles, ``max(P95(d(pred -> gt)), P95(d(gt -> pred)))``.
  - ``hd95_medpy`` (MedPy's ``medpy.metric.binary.hd95``, used by SAMed, TransUNet and H-SAM): the 95th percentile
    of both directions' distances pooled, ``P95(d(pred -> gt) + d(gt -> pred))`` (``+`` = concatenation).

  Percentiles are linearly interpolated (numpy's default, as in MedPy). Each has a ``_vox`` twin (``hd95_vox``,
  ``hd95_medpy_vox``) that is always in voxel units (spacing 1 on every axis) whatever the spacing and ``units``, so
  one call can report millimetres and the voxel numbers that SAMed and H-SAM publish side by side.
- **ASSD** (computed by MONAI's ``compute_average_surface_distance``; matches MedPy's ``assd``): the mean of the
  distances of both directions pooled together.
- **NSD** (normalised surface Dice at tolerance tau, Nikolov et al. 2021) follows DeepMind's ``surface-distance``
  reference: the surface is made of sub-voxel surface elements (marching squares/cubes on the voxel-corner lattice),
  each weighted by its length (2D) or area (3D) in mm; NSD = (area of pred surface within tau of the gt surface +
  area of gt surface within tau of the pred surface) / (total area of both). Computed by MONAI's
  ``compute_surface_dice(..., use_subvoxels=True)``, which matches DeepMind's code. A distance equal to tau counts
  as within.

Empty-mask conventions (per class and case)
-------------------------------------------
==================  =====  =====  =====  =====  =====
case                Dice   IoU    HD95   NSD    ASSD
==================  =====  =====  =====  =====  =====
both empty          1      1      0      1      0
only one empty      0      0      NaN    0      NaN
==================  =====  =====  =====  =====  =====

The HD95 column holds for every HD95 variant. A NaN distance means "undefined", not "good": :func:`summarize`
leaves NaNs out of means and standard deviations and reports how many values were missing for each class and
metric; it never turns them into 0. Unlike SAMed's ``calculate_metric_percase``, a false positive on a class absent
from the ground truth scores Dice 0, not 1 (and a missed organ has an undefined HD95, not SAMed's 0).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Mapping, Sequence

import numpy as np
import torch

from samadapt.errors import InputError
from samadapt.overlap import dice_from_counts, mask_counts

METRICS: tuple[str, ...] = ("dice", "iou", "hd95", "nsd", "assd")
"""The metrics :func:`compute_metrics` computes by default, in the order they are reported."""

HD95_VARIANTS: tuple[str, ...] = ("hd95_vox", "hd95_medpy", "hd95_medpy_vox")
"""Further HD95 definitions/units :func:`compute_metrics` accepts (see the module docstring)."""

ALL_METRICS: tuple[str, ...] = (*METRICS[:3], *HD95_VARIANTS, *METRICS[3:])
"""Every name :func:`compute_metrics` accepts, in the order they are reported."""

VOXEL_METRICS = frozenset({"hd95_vox", "hd95_medpy_vox"})
"""Distances always in voxel units, whatever the spacing."""

DISTANCE_METRICS = frozenset({"hd95", "assd", *HD95_VARIANTS})
"""Metrics that are NaN (missing) when exactly one of the two masks is empty."""

__all__ = [
    "METRICS",
    "ALL_METRICS",
    "HD95_VARIANTS",
    "VOXEL_METRICS",
    "DISTANCE_METRICS",
    "compute_metrics",
    "dice",
    "iou",
    "summarize",
    "rows_from_result",
]


# --------------------------------------------------------------------------------------------------------------------
# input checking


def _as_label_map(a: np.ndarray, name: str) -> np.ndarray:
    """Return ``a`` as an integer (or bool) numpy array; floats must hold whole numbers."""
    arr = np.asarray(a)
    if arr.dtype == bool or np.issubdtype(arr.dtype, np.integer):
        return arr
    if np.issubdtype(arr.dtype, np.floating):
        if not np.all(np.isfinite(arr)) or not np.array_equal(arr, np.round(arr)):
            raise InputError(name, f"expected an integer label map, got {arr.dtype} values that are not whole numbers")
        return arr.astype(np.int64)
    raise InputError(name, f"expected an integer label map, got dtype {arr.dtype}")


def _resolve_spacing(
    spacing: float | Sequence[float] | None, ndim: int, units: str | None
) -> tuple[tuple[float, ...], str]:
    """Spacing in numpy axis order and the unit it yields ("mm" or "voxel")."""
    if units not in (None, "mm", "voxel"):
        raise InputError("units", f"expected 'mm' or 'voxel', got {units!r}")
    if units == "voxel" or (units is None and spacing is None):
        return (1.0,) * ndim, "voxel"
    if spacing is None:
        raise InputError("spacing", "units='mm' needs the voxel spacing; pass spacing=... or units='voxel'")
    sp = tuple(float(s) for s in np.atleast_1d(np.asarray(spacing, dtype=float)))
    if len(sp) == 1:
        sp = sp * ndim
    if len(sp) != ndim:
        raise InputError("spacing", f"expected {ndim} values (one per array axis, numpy order), got {len(sp)}: {sp}")
    if not all(math.isfinite(s) and s > 0 for s in sp):
        raise InputError("spacing", f"expected positive finite values, got {sp}")
    return sp, "mm"


def _check_metrics(metrics: Iterable[str]) -> tuple[str, ...]:
    names = tuple(metrics)
    unknown = [m for m in names if m not in ALL_METRICS]
    if unknown:
        raise InputError("metrics", f"unknown metric(s) {unknown}; expected some of {list(ALL_METRICS)}")
    return names


# --------------------------------------------------------------------------------------------------------------------
# overlap metrics


def _overlap(p: np.ndarray, g: np.ndarray) -> tuple[float, float]:
    """Dice and IoU of two boolean masks, with the empty conventions of the module docstring."""
    counts = mask_counts(p, g)
    inter, union = counts[0], counts[1] + counts[2] - counts[0]
    return float(dice_from_counts(counts)), (1.0 if union == 0 else float(inter / union))


def dice(pred: np.ndarray, gt: np.ndarray) -> float:
    """Dice coefficient of two binary masks (any non-zero value is foreground).

    Both empty -> 1.0; exactly one empty -> 0.0.
    """
    p, g = np.asarray(pred) != 0, np.asarray(gt) != 0
    if p.shape != g.shape:
        raise InputError("pred/gt", f"shapes differ: {p.shape} vs {g.shape}")
    return _overlap(p, g)[0]


def iou(pred: np.ndarray, gt: np.ndarray) -> float:
    """Intersection over union (Jaccard) of two binary masks. Both empty -> 1.0; exactly one empty -> 0.0."""
    p, g = np.asarray(pred) != 0, np.asarray(gt) != 0
    if p.shape != g.shape:
        raise InputError("pred/gt", f"shapes differ: {p.shape} vs {g.shape}")
    return _overlap(p, g)[1]


# --------------------------------------------------------------------------------------------------------------------
# surface metrics (MONAI)


def _surface_voxels(mask: np.ndarray) -> np.ndarray:
    """Coordinates (N x ndim, voxel units) of the boundary voxels of a boolean mask (face connectivity)."""
    from scipy.ndimage import binary_erosion, generate_binary_structure

    interior = binary_erosion(mask, structure=generate_binary_structure(mask.ndim, 1), border_value=0)
    return np.argwhere(mask & ~interior).astype(np.float64)


def _directed_distances(
    sp_coords: np.ndarray, sg_coords: np.ndarray, spacing: tuple[float, ...]
) -> tuple[np.ndarray, np.ndarray]:
    """Distances ``d(pred -> gt)`` and ``d(gt -> pred)`` between two surfaces (voxel coordinates), in spacing units."""
    from scipy.spatial import cKDTree

    scale = np.asarray(spacing, dtype=np.float64)
    a, b = sp_coords * scale, sg_coords * scale
    return cKDTree(b).query(a, k=1)[0], cKDTree(a).query(b, k=1)[0]


def _hd95(
    p: np.ndarray, g: np.ndarray, spacing: tuple[float, ...], wanted: set[str]
) -> dict[str, float]:
    """The HD95 variants in ``wanted`` of two non-empty boolean masks (definitions in the module docstring)."""
    sp_coords, sg_coords = _surface_voxels(p), _surface_voxels(g)
    out: dict[str, float] = {}
    for suffix, sp in (("", spacing), ("_vox", (1.0,) * p.ndim)):
        names = {f"hd95{suffix}", f"hd95_medpy{suffix}"} & wanted
        if not names:
            continue
        d_pg, d_gp = _directed_distances(sp_coords, sg_coords, sp)
        if f"hd95{suffix}" in names:
            out[f"hd95{suffix}"] = float(max(np.percentile(d_pg, 95), np.percentile(d_gp, 95)))
        if f"hd95_medpy{suffix}" in names:
            out[f"hd95_medpy{suffix}"] = float(np.percentile(np.concatenate([d_pg, d_gp]), 95))
    return out


def _surface(
    p: np.ndarray, g: np.ndarray, spacing: tuple[float, ...], tau: float, wanted: set[str]
) -> dict[str, float]:
    """HD95 variants (scipy), ASSD and NSD (MONAI) of two non-empty boolean masks."""
    from monai.metrics import compute_average_surface_distance, compute_surface_dice

    out = _hd95(p, g, spacing, wanted)
    if not wanted & {"assd", "nsd"}:
        return out
    yp = torch.from_numpy(np.ascontiguousarray(p))[None, None]
    yg = torch.from_numpy(np.ascontiguousarray(g))[None, None]
    sp = list(spacing)
    with warnings.catch_warnings():
        # empty masks never reach MONAI (the caller applies the conventions), so its empty-mask warnings cannot
        # concern us; its internal use of its own deprecated argument is not ours to fix either
        warnings.filterwarnings("ignore", category=UserWarning, message=".*is all 0.*")
        warnings.filterwarnings("ignore", category=FutureWarning, message=".*always_return_as_numpy.*")
        if "assd" in wanted:
            out["assd"] = float(
                compute_average_surface_distance(yp, yg, include_background=True, symmetric=True, spacing=sp)[0, 0]
            )
        if "nsd" in wanted:
            out["nsd"] = float(
                compute_surface_dice(
                    yp.float(), yg.float(), [float(tau)], include_background=True, spacing=sp, use_subvoxels=True
                )[0, 0]
            )
    return out


def compute_metrics(
    pred: np.ndarray,
    gt: np.ndarray,
    classes: list[int],
    spacing: float | Sequence[float] | None,
    nsd_tolerance_mm: float = 1.0,
    metrics: Sequence[str] = METRICS,
    *,
    units: str | None = None,
) -> dict[int, dict[str, float]]:
    """Score ``pred`` against ``gt`` for each class in ``classes``.

    Args:
        pred, gt: integer label maps of the same shape, 2D or 3D (axes of length 1 are dropped first).
        classes: label values to score, each as the binary mask ``label == c``.
        spacing: voxel size in mm per axis, in numpy axis order (a single number means isotropic). ``None`` scores
            distances in voxel units (SAMed/H-SAM compatibility).
        nsd_tolerance_mm: NSD tolerance tau, in mm (in voxels when the units are voxels).
        metrics: which of :data:`ALL_METRICS` to compute (default :data:`METRICS`); ``hd95_medpy`` is the paper
            definition of SAMed/H-SAM, the ``_vox`` names are always in voxels.
        units: ``None`` (mm when ``spacing`` is given, voxels otherwise), ``"mm"`` (requires ``spacing``) or
            ``"voxel"`` (ignores ``spacing``).

    Returns:
        ``{class: {metric: value}}``, metrics in the order asked. Empty masks follow the table in the module
        docstring: both empty -> Dice 1, IoU 1, HD95 0, NSD 1, ASSD 0; exactly one empty -> Dice 0, IoU 0, NSD 0,
        HD95 (every variant) and ASSD NaN (missing, never 0).

    Raises:
        InputError: shapes differ, a map is not an integer label map, it is not 2D/3D, the spacing does not match
            the number of axes, an unknown metric is asked, or the tolerance is negative.
    """
    names = _check_metrics(metrics)
    p_all = _as_label_map(pred, "pred")
    g_all = _as_label_map(gt, "gt")
    if p_all.shape != g_all.shape:
        raise InputError("pred/gt", f"shapes differ: prediction {p_all.shape} vs ground truth {g_all.shape}")
    sp, _ = _resolve_spacing(spacing, g_all.ndim, units)
    if not (math.isfinite(float(nsd_tolerance_mm)) and float(nsd_tolerance_mm) >= 0):
        raise InputError("nsd_tolerance_mm", f"expected a finite value >= 0, got {nsd_tolerance_mm}")

    keep = [ax for ax, n in enumerate(g_all.shape) if n != 1]
    if len(keep) not in (2, 3):
        raise InputError(
            "pred/gt", f"expected a 2D or 3D label map (after dropping axes of length 1), got shape {g_all.shape}"
        )
    if len(keep) != g_all.ndim:
        new_shape = tuple(g_all.shape[ax] for ax in keep)
        p_all, g_all = p_all.reshape(new_shape), g_all.reshape(new_shape)
        sp = tuple(sp[ax] for ax in keep)

    surface_wanted = {m for m in names if m in DISTANCE_METRICS or m == "nsd"}
    result: dict[int, dict[str, float]] = {}
    for c in classes:
        c = int(c)
        p = p_all == c
        g = g_all == c
        d, j = _overlap(p, g)
        values: dict[str, float] = {"dice": d, "iou": j}
        p_any, g_any = bool(p.any()), bool(g.any())
        if surface_wanted:
            if not p_any and not g_any:
                values.update({m: 0.0 for m in DISTANCE_METRICS}, nsd=1.0)
            elif not p_any or not g_any:
                values.update({m: math.nan for m in DISTANCE_METRICS}, nsd=0.0)
            else:
                values.update(_surface(p, g, sp, float(nsd_tolerance_mm), surface_wanted))
        result[c] = {m: float(values[m]) for m in names}
    return result


# --------------------------------------------------------------------------------------------------------------------
# aggregation


def rows_from_result(case: str, result: Mapping[int, Mapping[str, float]]) -> list[dict]:
    """Flatten one :func:`compute_metrics` result into rows ``{"case", "class", metric...}`` for :func:`summarize`."""
    return [{"case": case, "class": int(c), **{k: float(v) for k, v in vals.items()}} for c, vals in result.items()]


def _stats(values: Sequence[float]) -> dict[str, float | int]:
    arr = np.asarray(values, dtype=float)
    ok = arr[~np.isnan(arr)]
    return {
        "mean": float(ok.mean()) if ok.size else math.nan,
        "std": float(ok.std()) if ok.size else math.nan,
        "n": int(ok.size),
        "missing": int(arr.size - ok.size),
    }


def summarize(rows: Iterable[Mapping]) -> dict:
    """Mean and standard deviation per class and metric, NaN-aware, with counts of missing values.

    Args:
        rows: records ``{"case": str, "class": int, "<metric>": float, ...}``, one per case and class (as written to
            ``per_case.csv``; see :func:`rows_from_result`).

    Returns:
        ``{"metrics": [...], "classes": [...], "num_cases": N,
        "per_class": {"<class>": {"<metric>": {"mean", "std", "n", "missing"}}},
        "foreground": {"<metric>": {"mean", "std", "n", "missing"}}}``.

        ``per_class``: over the cases of that class; ``n`` values were defined, ``missing`` were NaN (e.g. HD95 when
        one mask is empty) and are left out of the mean and std, never counted as 0.
        ``foreground``: each case is first averaged over its classes (NaNs left out), then the mean and std are taken
        over cases; ``missing`` counts cases with no defined value for that metric in any class.
        Standard deviations are population (ddof=0). Means of metrics with no defined value are NaN.
    """
    rows = list(rows)
    metrics: list[str] = []
    for r in rows:
        for k in r:
            if k not in ("case", "class") and k not in metrics:
                metrics.append(k)
    metrics.sort(key=lambda m: (ALL_METRICS.index(m) if m in ALL_METRICS else len(ALL_METRICS), m))
    classes = sorted({int(r["class"]) for r in rows})
    cases = list(dict.fromkeys(str(r["case"]) for r in rows))

    def val(r: Mapping, m: str) -> float:
        v = r.get(m)
        return math.nan if v is None else float(v)

    per_class = {
        str(c): {m: _stats([val(r, m) for r in rows if int(r["class"]) == c]) for m in metrics} for c in classes
    }
    foreground: dict[str, dict] = {}
    for m in metrics:
        per_case = []
        for case in cases:
            vals = np.asarray([val(r, m) for r in rows if str(r["case"]) == case], dtype=float)
            vals = vals[~np.isnan(vals)]
            per_case.append(float(vals.mean()) if vals.size else math.nan)
        foreground[m] = _stats(per_case)
    return {
        "metrics": metrics,
        "classes": classes,
        "num_cases": len(cases),
        "per_class": per_class,
        "foreground": foreground,
    }
