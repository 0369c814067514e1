"""The served model: one ``Predictor`` applied to single slices, with the slice embedding computed once.

``ServedModel.predict_slice(item, prompts)`` takes one slice item (the ``SliceDataset`` layout: ``image``
3 x S x S, ``key``, ``pad``) and returns class probabilities (K + 1) x H x W at the slice's own size. Prompts are
given in the slice's pixel frame (x = column, y = row) and mapped to the S x S input frame here. The encoder output
of each slice is kept (keyed by the item's content hash) so that every click after the first only runs the
prompt encoder and the decoder.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..backbones.base import Features
from ..data.preprocessing import PadInfo, restore
from ..engine.device import autocast
from ..engine.predict import Predictor
from ..methods.base import Method
from ..methods.one_vs_rest import OneVsRest

#: Class colours of the page's overlay (RGB), class k uses entry (k - 1) modulo the length.
PALETTE = [(230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48), (145, 30, 180),
           (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212)]


@dataclass
class Prompts:
    """User prompts on one slice, in the slice's pixel frame: points (x, y, positive) and an optional box."""

    points: list[tuple[float, float, bool]] = field(default_factory=list)
    box: tuple[float, float, float, float] | None = None  # x0, y0, x1, y1

    def empty(self) -> bool:
        return not self.points and self.box is None

    def copy(self) -> "Prompts":
        return Prompts(list(self.points), self.box)

    def to_dict(self) -> dict:
        return {"points": [{"x": x, "y": y, "positive": p} for x, y, p in self.points],
                "box": list(self.box) if self.box is not None else None}


class ServedModel:
    """A ``Predictor`` plus what the page shows about it (``info``) and a per-slice embedding memory.

    ``class_names``: one name per foreground class (index k - 1 for class k). ``checkpoint``: the weights file, for
    the status line. ``memory``: how many slice embeddings are kept (least recently used are dropped).
    ``fast_key``: with it, whole volumes are predicted on the fastest path within tolerance, its ONNX graphs cached
    under this key (``samadapt.engine.path_choice.model_key``); prompts always run on the exact model."""

    def __init__(self, predictor: Predictor, class_names: list[str] | None = None,
                 checkpoint: str | Path | None = None, memory: int = 32, fast_key: Any = None):
        self.predictor = predictor
        self.fast_key = fast_key
        self.path_choice: dict | None = None  # the fast path's choice, once made
        self._volume_predictor: Predictor | None = None
        self.method: Method = predictor.method
        k = self.method.num_classes
        self.class_names = list(class_names or [])[:k] + [f"class {i}" for i in range(len(class_names or []) + 1,
                                                                                      k + 1)]
        self.checkpoint = str(checkpoint) if checkpoint else None
        self.memory = memory
        self._features: OrderedDict[str, Features] = OrderedDict()
        self.encoder_runs = 0  # how many slices went through the encoder (the rest came from memory)
        self.lock = threading.Lock()  # one forward at a time (the model is shared by every request)

    def volume_predictor(self, items: list[dict]) -> Predictor:
        """The predictor of whole-volume prediction: the exact one, or with ``fast_key`` the fastest path within
        tolerance (``samadapt.engine.path_choice``), chosen once by timing ``items`` (the first volume's first
        slices) and kept for every later volume."""
        if self.fast_key is None:
            return self.predictor
        with self.lock:
            if self._volume_predictor is None:
                from ..engine import path_choice

                sizes = sorted({1, self.predictor.batch_size})
                cands = path_choice.candidates(self.predictor, sizes, None, path_choice.export_folder(self.fast_key))
                self._volume_predictor, self.path_choice = path_choice.choose(cands, items[:max(sizes)])
            return self._volume_predictor

    # --- facts for the page ------------------------------------------------------------------------------------------
    @property
    def prompt_kinds(self) -> tuple[str, ...]:
        """The prompts the method's ``predict`` accepts ("points", "boxes"); empty for prompt-free methods."""
        base = self.method.heads[0] if isinstance(self.method, OneVsRest) else self.method
        return tuple(base.prompt_kinds)

    def info(self) -> dict:
        from ..engine.checkpoint import checkpoint_digest

        backbone = self.method.backbone
        digest = checkpoint_digest(self.checkpoint) if self.checkpoint else None
        return {
            "method": self.method.name,
            "backbone": backbone.name if backbone is not None else None,
            "backbone_weights": backbone.weights_id if backbone is not None else None,
            "checkpoint": Path(self.checkpoint).name if self.checkpoint else None,
            "checkpoint_sha256": digest,
            "device": str(self.predictor.device),
            "volume_path": (self.path_choice["chosen"] if self.path_choice else
                            "fastest within tolerance, chosen at the first volume" if self.fast_key is not None
                            else "exact"),
            "input_size": self.method.input_size,
            "prompt_kinds": list(self.prompt_kinds),
            "classes": [{"id": i, "name": n, "color": "#%02x%02x%02x" % PALETTE[(i - 1) % len(PALETTE)]}
                        for i, n in enumerate(self.class_names, start=1)],
        }

    # --- prediction ------------------------------------------------------------------------------------------------
    def _features_for(self, item: dict) -> Features | None:
        if not self.method.uses_backbone:
            return None
        key = item["key"]
        if key in self._features:
            self._features.move_to_end(key)
            return self._features[key]
        image = item["image"][None].to(self.predictor.device)
        with autocast(self.predictor.device, self.predictor.amp):
            feats = self.method.features({"image": image})
        self.encoder_runs += 1
        self._features[key] = feats
        while len(self._features) > self.memory:
            self._features.popitem(last=False)
        return feats

    @torch.inference_mode()
    def predict_slice(self, item: dict, prompts: Prompts | None = None, cls: int = 1) -> Tensor:
        """Probabilities (K + 1) x H x W for one slice item; with ``prompts``, 2 x H x W for class ``cls`` only
        (the prompted method, or its head ``cls`` when it runs one-vs-rest)."""
        pad: PadInfo = item["pad"]
        batch = {"image": item["image"][None].to(self.predictor.device)}
        method: Method = self.method
        with self.lock:
            feats = self._features_for(item)
            if feats is not None:
                batch["features"] = feats
            if prompts is not None and not prompts.empty():
                batch.update(self._prompt_tensors(prompts, pad))
                if isinstance(method, OneVsRest):
                    method = method.heads[cls - 1]
            with autocast(self.predictor.device, self.predictor.amp):
                probs = method.predict(batch)[0].float().cpu()
        return restore(probs, pad, mode="bilinear")

    def _prompt_tensors(self, prompts: Prompts, pad: PadInfo) -> dict[str, Tensor]:
        """Slice-frame prompts -> the batch entries in the S x S frame (resize of the longest side, top-left)."""
        sx, sy = pad.new_w / pad.orig_w, pad.new_h / pad.orig_h
        dev = self.predictor.device
        out: dict[str, Tensor] = {}
        if prompts.points:
            coords = [[(x + 0.5) * sx, (y + 0.5) * sy] for x, y, _ in prompts.points]
            out["points"] = torch.tensor([coords], dtype=torch.float32, device=dev)
            out["point_labels"] = torch.tensor([[1 if p else 0 for _, _, p in prompts.points]], device=dev)
        if prompts.box is not None:
            x0, y0, x1, y1 = prompts.box
            out["boxes"] = torch.tensor([[x0 * sx, y0 * sy, (x1 + 1) * sx, (y1 + 1) * sy]], dtype=torch.float32,
                                        device=dev)
        return out
