"""Prediction: a trained run (or a zero-shot method) applied to whole cases, slice by slice.

``Predictor.predict_case`` takes a ``Case`` (2D picture or 3D volume) and returns a label map of exactly the
case's spatial shape; ``predict_to_folder`` writes one mask per input case with the input's geometry (NIfTI or the
input's format; PNG for 2D pictures), atomically.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np
import torch
from rich.progress import Progress

from ..data.cases import Case, write_label_like
from ..data.preprocessing import LONGEST, Geometry, IntensityConfig
from ..data.slices import collate, reassemble, volume_slices
from ..errors import CheckpointError, ConfigError, InputError
from ..methods import Method
from .checkpoint import load_checkpoint
from ..config.run_config import RunConfig, apply_overrides
from .device import autocast, resolve_device, to_device
from .fast import FastOptions, apply_fast_options, bf16_native
from .rundir import checkpoint_config, resolve_checkpoint


class Predictor:
    """Runs ``method.predict`` over the slices of a case, in batches, under ``inference_mode``.

    ``fast`` (a ``FastOptions``; None = the exact fp32 path) patches the method in place for faster inference
    (conv+BN fusion, channels-last, bf16 where native); see ``samadapt.engine.fast`` for the tolerances.
    ``geometry``: how slices become the method's S x S input and back (from the run's ``data.resize``)."""

    geometry: Geometry = LONGEST  # a class default for subclasses that set their attributes themselves

    def __init__(self, method: Method, intensity: IntensityConfig, axis: int = 0, batch_size: int = 8,
                 device: torch.device | None = None, amp: str = "none", feature_source: Callable | None = None,
                 fast: FastOptions | None = None, geometry: Geometry = LONGEST):
        self.device = device or torch.device("cpu")
        self.method = method.to(self.device).eval()
        self.intensity = intensity
        self.geometry = geometry
        self.axis = axis
        self.batch_size = batch_size
        self.fast = fast
        self.fast_report = apply_fast_options(self.method, fast) if fast is not None else {}
        amp = "none" if amp == "auto" else amp  # train.amp auto: prediction's precision is the fast options' choice
        self.amp = fast.amp(self.device, amp) if fast is not None else amp
        self.feature_source = feature_source
        self.modality: str | None = None  # the training data's modality, when known (from a checkpoint)
        self.input_size = self.method.input_size
        self.clicks = 0  # corrective clicks simulated from each case's label (``use_clicks``); 0 = plain predict

    def use_clicks(self, clicks: int) -> "Predictor":
        """Predict after ``clicks`` corrective clicks per slice simulated from the ground truth (interactive methods,
        ``Method.simulates_clicks``); every case must then carry its label. 0 turns it off."""
        if clicks < 0:
            raise ConfigError(f"--clicks {clicks}: expected >= 0")
        if clicks and not self.method.simulates_clicks:
            raise ConfigError(f"--clicks: method {self.method.name!r} does not refine with simulated clicks")
        self.clicks = int(clicks)
        return self

    def _check_label(self, case: Case) -> None:
        if self.clicks and case.label is None:
            raise InputError(case.source or case.id, f"--clicks {self.clicks} simulates clicks from the ground truth, "
                                                     "and this case has no label")

    @classmethod
    def from_config(cls, config: RunConfig, num_classes: int, checkpoint: str | Path | None = None,
                    device: str = "auto", batch_size: int = 8, use_cache: bool = False,
                    fast: FastOptions | None = None) -> "Predictor":
        """Build the method of ``config``; ``use_cache`` reads/writes encoder outputs in the embedding cache;
        ``fast``: fast inference options (None = exact)."""
        from .run import build_model, feature_source, geometry_config, intensity_config

        dev = resolve_device(device)
        backbone, method = build_model(config, num_classes, dev)
        if checkpoint is not None:
            load_checkpoint(method, checkpoint, expect_backbone={"name": backbone.name,
                                                                 "weights_id": backbone.weights_id})
        elif method.trainable:
            raise CheckpointError(f"method {method.name!r} needs a trained checkpoint (--checkpoint or --run)")
        features = feature_source(backbone, method, config.data, dev) if use_cache else None
        return cls(method, intensity_config(config.data), config.data.axis, batch_size, dev, config.train.amp,
                   features, fast, geometry_config(config.data))

    @classmethod
    def from_checkpoint(cls, checkpoint: str | Path, device: str = "auto", batch_size: int = 8,
                        use_cache: bool = False, overrides: list[str] | None = None,
                        fast: FastOptions | None = None) -> "Predictor":
        """Rebuild the run's backbone and method from the checkpoint's manifest and load its weights.

        ``overrides`` (``key.sub=value``) change the run's config first, e.g. an inference-only method option."""
        config, manifest = checkpoint_config(checkpoint)
        apply_overrides(config, overrides or [])
        predictor = cls.from_config(config, manifest["method"]["num_classes"], checkpoint, device, batch_size,
                                    use_cache, fast)
        predictor.modality = ((manifest.get("data") or {}).get("source") or {}).get("modality")
        return predictor

    @classmethod
    def from_run(cls, run_or_checkpoint: str | Path, **kwargs: Any) -> "Predictor":
        """``from_checkpoint`` on the best checkpoint of a run folder, or on a checkpoint file
        (``samadapt.engine.rundir.resolve_checkpoint``); ``kwargs`` as for ``from_checkpoint``."""
        return cls.from_checkpoint(resolve_checkpoint(run_or_checkpoint), **kwargs)

    def describe(self) -> dict[str, Any]:
        """How this predictor computes: device, autocast mode, the fast options and what they changed.

        ``amp`` is the autocast actually used (``bf16`` where ``FastOptions.bf16`` is ``on``, or ``auto`` on a
        device that computes bf16 natively); ``bf16_native`` says whether this device does."""
        from dataclasses import asdict

        return {"device": str(self.device), "amp": self.amp, "bf16_native": bf16_native(self.device),
                "fast": asdict(self.fast) if self.fast is not None else None, "fast_report": dict(self.fast_report),
                "clicks": self.clicks}

    def summary(self) -> str:
        """One line for people: what ``describe`` says (printed by ``samadapt predict``)."""
        d = self.describe()
        if d["fast"] is None:
            run_amp = f", {d['amp']} autocast from the run" if d["amp"] != "none" else ""
            return f"exact path on {d['device']}{run_amp}"
        done = ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in d["fast_report"].items())
        if d["amp"] == "bf16":
            why = {"on": "--bf16 on", "auto": "auto: this device computes bf16 natively"}.get(d["fast"]["bf16"], "run")
            precision = f"bf16 autocast ({why}; masks may differ slightly from fp32, --bf16 off for fp32)"
        else:
            precision = "fp32" + ("" if d["bf16_native"] or d["fast"]["bf16"] == "off"
                                  else " (auto: no native bf16 on this device)")
        return f"fast path on {d['device']}: {done}; {precision}"

    @torch.inference_mode()
    def predict_probabilities(self, items: list[dict]) -> list[torch.Tensor]:
        """Class probabilities (K+1) x S x S for each slice item (the batch convention's per-item dict)."""
        out: list[torch.Tensor] = []
        for start in range(0, len(items), self.batch_size):
            batch = collate(items[start:start + self.batch_size])
            if self.feature_source is not None:
                batch["features"] = self.feature_source(batch)
            batch = to_device(batch, self.device)
            if self.fast is not None and self.fast.channels_last:
                batch["image"] = batch["image"].contiguous(memory_format=torch.channels_last)
            with autocast(self.device, self.amp):
                if self.clicks:
                    probs = self.method.output_probabilities(self.method.clicks_output(batch, self.clicks))
                else:
                    probs = self.method.predict(batch)
            out.extend(probs.float().cpu())
        return out

    def predict_case(self, case: Case) -> np.ndarray:
        """Label map Z x Y x X (the case's spatial shape) for one case."""
        self._check_label(case)
        slices = volume_slices(case, self.axis, self.input_size, self.intensity, self.geometry)
        probs = self.predict_probabilities([slices[i] for i in range(len(slices))])
        return reassemble(probs, self.axis, case, geometry=self.geometry)

    def predict_cases(self, cases: Iterable[Case], out_dir: str | Path | None = None,
                      total: int | None = None) -> dict[str, np.ndarray | Path]:
        """Predict every case; write each mask into ``out_dir`` when given (returns paths), else return arrays.

        Slices of consecutive cases share batches (2D pictures are one slice each, so a folder of pictures runs
        ``batch_size`` pictures per forward pass); each case is finished and written as soon as its slices are."""
        results: dict[str, Any] = {}
        pending: list[tuple[Case, int]] = []  # cases whose slices are in ``items``, with their slice counts
        items: list[dict] = []

        def flush(progress, task) -> None:
            probs = self.predict_probabilities(items)
            start = 0
            for case, n in pending:
                label = reassemble(probs[start:start + n], self.axis, case, geometry=self.geometry)
                start += n
                if out_dir is None:
                    results[case.id] = label
                else:
                    results[case.id] = write_label_like(label, case, Path(out_dir) / f"{case.id}{case.file_ending}")
                progress.advance(task)
            pending.clear()
            items.clear()

        with Progress(transient=True) as progress:
            task = progress.add_task("predict", total=total)
            for case in cases:
                self._check_label(case)
                slices = volume_slices(case, self.axis, self.input_size, self.intensity, self.geometry)
                items.extend(slices[i] for i in range(len(slices)))
                pending.append((case, len(slices)))
                if len(items) >= self.batch_size:
                    flush(progress, task)
            if pending:
                flush(progress, task)
        return results


MANIFEST_NAME = "prediction.json"


def write_prediction_manifest(out_dir: str | Path, predictor: Predictor, **fields: Any) -> Path:
    """Write ``out_dir/prediction.json``: the common manifest header, ``predictor.describe()`` (device, autocast,
    fast options), the CPU's capabilities and ``fields`` (inputs, model, cases). Returns its path."""
    from ..io_utils import atomic_write_json
    from .device import cpu_capabilities
    from .manifest import base_manifest

    path = Path(out_dir) / MANIFEST_NAME
    atomic_write_json(path, base_manifest(prediction=predictor.describe(), cpu=cpu_capabilities(), **fields))
    return path
