"""Collate the ``samadapt compare`` reports written by ``benchmarks/mni152_methods.sh`` into Markdown tables.

Each model appears once, with the metrics of the first report that scored it (the same trained run scores the same
in every report); its prediction time is the fastest of its scorings, because the reports ran at different loads.

    python benchmarks/collate_results.py OUT/brain/report_desam OUT/brain/report_hetersam ... > brain.md
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

COLUMNS = ("dice", "iou", "hd95", "nsd", "assd")


def _fmt(value: float, digits: int = 3) -> str:
    return "n/a" if value is None or math.isnan(value) else f"{value:.{digits}f}"


def collate(reports: list[Path]) -> str:
    """One Markdown table: a row per model and class over ``reports`` (folders holding ``metrics.json``)."""
    rows: dict[tuple, dict] = {}
    fastest: dict[tuple, float] = {}
    for report in reports:
        for row in json.loads((report / "metrics.json").read_text()):
            key = (row["model"], row["class"], row["case"], row["seed"])
            rows.setdefault(key, row)
            fastest[key] = min(fastest.get(key, math.inf), row["predict_s_per_slice"])
    lines = ["| model | class | case | seed | Dice | IoU | HD95 mm | NSD 1 mm | ASSD mm | train s | predict s/slice |",
             "|" + "---|" * 11]
    for key, r in rows.items():
        metrics = " | ".join(_fmt(r[c], 1 if c in ("hd95", "assd") else 3) for c in COLUMNS)
        lines.append(f"| {r['model']} | {r['class']} | {r['case']} | {r['seed']} | {metrics} | "
                     f"{r['train_s']:.0f} | {_fmt(fastest[key], 2)} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("reports", nargs="+", type=Path, help="report folders of samadapt compare")
    print(collate(parser.parse_args().reports), end="")


if __name__ == "__main__":
    main()
