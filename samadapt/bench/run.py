"""``samadapt benchmark``: run the parts asked for, keep each part's result as JSON, write one RESULTS.md.

Parts (each also usable alone): ``accuracy`` (every method and baseline on the demo tasks, one training budget,
several seeds), ``latency`` (per-image prediction time of every method against the stock LiteMedSAM forward),
``cost`` (training step time with and without the embedding cache, peak RSS of training and prediction) and
``volume`` (seconds per 3D volume through the slice-wise pipeline). A part's result is ``OUT/<part>.json``; the
report is assembled from every part result present, so parts run by separate invocations land in one report, and
an accuracy task whose result exists for the same settings is not run again.
"""

from __future__ import annotations

import json
import os
import platform
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Sequence

from ..engine.device import cpu_capabilities
from ..engine.manifest import git_commit, package_versions
from ..errors import ConfigError
from ..io_utils import atomic_write_json, atomic_write_text
from . import accuracy, cost, latency, volume
from .selection import measured_methods

PARTS = ("accuracy", "latency", "cost", "volume")


def machine() -> dict:
    """CPU model, logical cores, SIMD flags that matter for inference, memory, Python and package versions."""
    mem = None
    try:
        mem = int(Path("/proc/meminfo").read_text().split()[1]) / 2**20
    except OSError:
        pass
    cpu = cpu_capabilities()
    return {"cpu": cpu["cpu"], "cores": cpu["cores"], "simd": cpu["simd"], "bf16_native": cpu["bf16_native"],
            "memory_gib": mem, "python": platform.python_version(), "platform": platform.platform(),
            "versions": package_versions(), "commit": git_commit()}


def _store(out: Path, part: str, result: dict, command: str) -> None:
    result = {**result, "command": command, "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "machine": machine(), "load_average": list(os.getloadavg())}
    atomic_write_json(out / f"{part}.json", result)


def run_benchmark(out: str | Path, parts: Sequence[str] = PARTS, *, tasks: Sequence[str] = tuple(accuracy.TASKS),
                  seeds: Sequence[int] = (0, 1, 2), budget: str = "converge", minutes: float = 1.5,
                  patience: int = accuracy.CONVERGE["patience"], max_epochs: int = accuracy.CONVERGE["epochs"],
                  methods: Sequence[str] | None = None,
                  images: int = 4, batch: int = 4, threads: int = 2, profile: bool = True, steps: int = 2,
                  volume_runs: Sequence[str] = volume.DEFAULT_RUNS, backbone: str = "litemedsam",
                  backbones: Sequence[str] = ("litemedsam",), shifts: bool = True, models: Sequence[str] = (),
                  trained: str | Path | None = None, command: str | None = None, results: str | Path | None = None) -> Path:
    """Run ``parts`` into ``out`` and write the report (``results``, default ``out/RESULTS.md``); returns its path.

    ``budget`` of the accuracy part: ``converge`` (each model trains until validation Dice has not improved for
    ``patience`` validations, at most once per ``CONVERGE["val_every_steps"]`` optimizer steps, at most
    ``max_epochs`` times the task's epoch scale) or ``minutes`` (``minutes`` of wall-clock training per model:
    depends on the CPU, labelled so in the report). ``methods`` restricts the latency and cost parts (default: every
    method); ``backbone`` is for the latency, cost and volume parts (``tiny`` for a quick check of the machinery);
    the accuracy part runs every task on each of ``backbones``; ``shifts=False`` skips its shifted test sets;
    ``models`` chooses accuracy models by label (``-LABEL`` leaves one out; ``accuracy.select_models``);
    ``trained``: a folder of trained runs the latency and volume parts time where a method has one
    (``latency.trained_runs``; e.g. ``out/accuracy/mni152-tissue-10/runs``).
    """
    out = Path(out)
    if budget not in ("converge", "minutes"):
        raise ConfigError(f"benchmark budget must be converge or minutes, got {budget!r}")
    unknown = sorted(set(parts) - set(PARTS))
    if unknown:
        raise ConfigError(f"unknown benchmark part(s) {unknown}; available: {', '.join(PARTS)}")
    command = command or "samadapt benchmark " + " ".join(sys.argv[2:])
    out.mkdir(parents=True, exist_ok=True)
    if "accuracy" in parts:  # tasks accumulate over invocations (each with its command)
        previous = out / "accuracy.json"
        done = json.loads(previous.read_text())["tasks"] if previous.exists() else {}
        limits = (dict(epochs=max_epochs, patience=patience, val_every_steps=accuracy.CONVERGE["val_every_steps"])
                  if budget == "converge" else dict(minutes=minutes))
        for name in backbones:
            for task in tasks:
                key = task if name == "litemedsam" else f"{task}@{name}"
                done[key] = {**accuracy.run_task(out, task, seeds, threads=threads, backbone=name, targets=shifts,
                                                 only=models,
                                                 **limits), "command": command}
        _store(out, "accuracy", {"tasks": done}, command)
    if "latency" in parts:
        names = list(methods or measured_methods("latency"))
        _store(out, "latency", latency.measure(out / "latency", images, batch, threads, names, profile, backbone,
                                               trained), command)
    if "cost" in parts:
        data = Path(accuracy.build_demo("mni152-brain", out / "data" / "mni152-brain"))
        names = [m for m in (methods or measured_methods("cost")) if m in measured_methods("cost")]
        _store(out, "cost", cost.measure(data, out / "cost", steps, threads, names, backbone), command)
    if "volume" in parts:
        _store(out, "volume", volume.measure(out / "volume", volume_runs, threads=threads, backbone=backbone,
                                             trained=trained), command)
    path = Path(results) if results else out / "RESULTS.md"
    atomic_write_text(path, report(out))
    return path


def _machine_text(m: dict) -> str:
    mem = f"{m['memory_gib']:.0f} GiB" if m.get("memory_gib") else "memory unknown"
    versions = ", ".join(f"{k} {v}" for k, v in m["versions"].items())
    return (f"{m['cpu']}, {m['cores']} logical cores, SIMD: {', '.join(m['simd']) or 'none found'}, {mem}; "
            f"Python {m['python']} on {m['platform']}; {versions}; samadapt commit {m['commit'] or 'unknown'}")


def _load_text(load: list[float], cores: int) -> str:
    """The load averages a part finished at, and what they say: the benchmark's own threads count in them, so only
    a 5-minute load above the core count (plus half a core) means other work shared the CPU."""
    shared = load[1] > cores + 0.5
    return (f" Load average when the part finished (1/5/15 min): {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f} on "
            f"{cores} cores (" + ("above the core count: other work shared the CPU and times are pessimistic)."
                                  if shared else "the benchmark's own threads count in it; no sign of other work)."))


def report(out: Path) -> str:
    """RESULTS.md from the part results in ``out`` (the parts not run yet are listed as missing)."""
    found = {p: json.loads((out / f"{p}.json").read_text()) for p in PARTS if (out / f"{p}.json").exists()}
    lines = ["# samadapt benchmark", "",
             "Written by `samadapt benchmark` from the part results in its output folder; every number below comes "
             "from the command shown with its part. Missing parts: " + (", ".join(p for p in PARTS if p not in found)
                                                                       or "none") + ".", ""]
    titles = {"accuracy": "Accuracy: every method on the demo tasks", "latency": "Prediction latency per 2D image",
              "cost": "Training cost: step time with and without the embedding cache, memory",
              "volume": "3D: seconds per volume"}
    for part, result in found.items():
        lines += [f"## {titles[part]}", ""]
        if part != "accuracy":
            lines += [f"Command: `{result['command']}` (finished {result['finished']}).", ""]
        load = result.get("load_average") if part != "accuracy" else None  # accuracy: per task
        lines += [f"Machine: {_machine_text(result['machine'])}." + (_load_text(load, result['machine']['cores'])
                                                                       if load else ""), ""]
        if part == "accuracy":
            for task in result["tasks"].values():
                lines += [accuracy.markdown(task), f"Command: `{task['command']}`.", ""]
        else:
            lines.append({"latency": latency.markdown, "cost": cost.markdown, "volume": volume.markdown}[part](result))
    return "\n".join(lines)
