"""``samadapt data check``: read every case of a dataset once and summarise what training would meet.

Like nnU-Net's dataset integrity check, but it collects every problem instead of stopping at the first: a case that
cannot be read (bad or truncated file, mask size or geometry differing from its image, undeclared label values,
missing channels) becomes one entry of ``report["errors"]`` naming the file; a dataset that cannot even be opened
gives a report with that single error.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from ..errors import InputError
from .cases import channel_mix
from .readers import open_dataset


def check_dataset(path: str | os.PathLike, format: str = "auto", axis: int = 0) -> dict[str, Any]:
    """Validate a dataset; returns a JSON-able report.

    Keys: ``path``, ``format``, ``ok`` (no errors), ``modality``, ``labels``, ``num_cases``, ``num_test_cases``,
    ``channels``, ``slices`` (labelled cases, along ``axis``), ``foreground_slices``, ``classes``
    (name -> ``{"id", "voxels", "cases"}``: voxel count and number of cases containing the class), ``spacing``
    and ``shape`` (``{"min", "max"}`` per axis z, y, x), ``intensity`` (``{"min", "max"}``), ``empty_masks`` (case
    ids whose label is all background), ``errors`` (``{"case", "file", "problem"}``) and ``warnings``.
    """
    report: dict[str, Any] = {"path": str(path), "format": format, "ok": False, "modality": None, "labels": {},
                              "num_cases": 0, "num_test_cases": 0, "channels": None, "slices": 0,
                              "foreground_slices": 0, "classes": {}, "spacing": None, "shape": None,
                              "intensity": None, "empty_masks": [], "errors": [], "warnings": []}
    try:
        source = open_dataset(path, format)
    except InputError as err:
        report["errors"].append({"case": None, "file": err.where, "problem": err.problem})
        return report
    report.update(format=source.format, modality=source.modality, labels=dict(source.labels),
                  num_cases=len(source.case_ids), num_test_cases=len(source.test_case_ids),
                  warnings=list(source.warnings))
    names = {v: k for k, v in source.labels.items()}
    voxels = {name: 0 for name in source.labels}
    present = {name: 0 for name in source.labels}
    spacings, shapes, channels = [], [], []
    lo, hi = np.inf, -np.inf
    alpha: list[str] = []
    for case_id in source.case_ids + source.test_case_ids:
        try:
            case = source.load(case_id)
        except InputError as err:
            report["errors"].append({"case": case_id, "file": err.where, "problem": err.problem})
            continue
        spacings.append(case.spacing)
        shapes.append(case.shape)
        channels.append((case.source or case_id, case.num_channels, case.is_2d))
        if case.meta.get("alpha_dropped"):
            alpha.append(case.source or case_id)
        if case.image.size:
            lo, hi = min(lo, float(case.image.min())), max(hi, float(case.image.max()))
        if case.label is None:
            continue
        report["slices"] += case.shape[axis]
        other = tuple(a for a in range(3) if a != axis)
        report["foreground_slices"] += int(np.asarray(case.label > 0).any(axis=other).sum())
        counts = np.bincount(np.asarray(case.label).ravel().astype(np.int64), minlength=len(names))
        for cid, n in enumerate(counts.tolist()):
            if cid in names:
                voxels[names[cid]] += int(n)
                present[names[cid]] += int(n > 0)
        if counts[1:].sum() == 0:
            report["empty_masks"].append(case_id)
    report["classes"] = {name: {"id": source.labels[name], "voxels": voxels[name], "cases": present[name]}
                         for name in sorted(source.labels, key=source.labels.get)}
    if spacings:
        sp, sh = np.asarray(spacings), np.asarray(shapes)
        report["spacing"] = {"min": sp.min(0).tolist(), "max": sp.max(0).tolist()}
        report["shape"] = {"min": sh.min(0).astype(int).tolist(), "max": sh.max(0).astype(int).tolist()}
        report["intensity"] = {"min": lo, "max": hi}
    mix_error, mix_note = channel_mix(channels)
    if mix_error:
        report["errors"].append({"case": None, "file": str(path), "problem": mix_error})
    if mix_note:
        report["warnings"].append(mix_note)
    if alpha:
        report["warnings"].append(f"{len(alpha)} picture(s) have an alpha channel, which is dropped (e.g. {alpha[0]})")
    counts = sorted({c for _, c, _ in channels})
    report["channels"] = counts[0] if len(counts) == 1 else counts
    for name, info in report["classes"].items():
        if info["id"] != 0 and report["num_cases"] and info["voxels"] == 0 and not report["errors"]:
            report["warnings"].append(f"class {name!r} (id {info['id']}) never occurs in the labelled cases")
    report["ok"] = not report["errors"]
    return report


def print_check(report: dict[str, Any], console=None) -> None:
    """Print a ``check_dataset`` report as rich tables (summary, classes, problems)."""
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    summary = Table(title=f"Dataset check: {report['path']}", show_header=False)
    summary.add_column("item", style="bold")
    summary.add_column("value")

    def fmt(values) -> str:
        return " x ".join(f"{v:g}" for v in values)

    rows = [("format", report["format"]), ("modality", report["modality"]),
            ("cases (labelled / test)", f"{report['num_cases']} / {report['num_test_cases']}"),
            ("channels", report["channels"]),
            ("slices (with foreground)", f"{report['slices']} ({report['foreground_slices']})")]
    if report.get("spacing"):
        rows.append(("spacing (z, y, x) mm", f"{fmt(report['spacing']['min'])}  ..  {fmt(report['spacing']['max'])}"))
        rows.append(("shape (z, y, x)", f"{fmt(report['shape']['min'])}  ..  {fmt(report['shape']['max'])}"))
        rows.append(("intensity", f"{report['intensity']['min']:g} .. {report['intensity']['max']:g}"))
    rows.append(("empty masks", ", ".join(report["empty_masks"]) or "none"))
    status = "[green]OK[/]" if report["ok"] else f"[red]{len(report['errors'])} problem(s)[/]"
    rows.append(("status", status))
    for k, v in rows:
        summary.add_row(k, str(v))
    console.print(summary)
    if report["classes"]:
        classes = Table(title="Classes")
        for col in ("id", "name", "voxels", "%", "cases"):
            classes.add_column(col, justify="right" if col != "name" else "left")
        total = sum(c["voxels"] for c in report["classes"].values()) or 1
        for name, c in report["classes"].items():
            classes.add_row(str(c["id"]), name, f"{c['voxels']:,}", f"{100 * c['voxels'] / total:.2f}",
                            str(c["cases"]))
        console.print(classes)
    if report["errors"]:
        problems = Table(title="Problems", style="red")
        problems.add_column("case")
        problems.add_column("file")
        problems.add_column("problem")
        for e in report["errors"]:
            problems.add_row(str(e["case"] or "-"), str(e["file"]), e["problem"])
        console.print(problems)
    for w in report["warnings"]:
        console.print(f"[yellow]warning:[/] {w}")
