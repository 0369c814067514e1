"""The method interface: an ``nn.Module`` built from a backbone, a typed config and a class count.

Batch convention (what the data pipeline yields and the engine collates; S = backbone input size):

- ``image``: B x 3 x S x S float in [0, 1], resized (longest side) and zero-padded to S x S.
- ``label``: B x S x S int64 class map (0 = background), resized nearest and padded with 0 (training only).
- ``features``: optional ``Features`` for ``image`` from the embedding cache; when absent, ``Method.features``
  runs the encoder (under ``no_grad`` unless the method trains through it).
- ``points``: optional B x N x 2 float pixel coordinates (x, y) in the S x S frame, with ``point_labels`` B x N
  (1 positive, 0 negative, -1 padding); ``boxes``: optional B x 4 (x0, y0, x1, y1) in the same frame.

``forward`` is differentiable (never under ``no_grad``); ``loss`` returns a dict of named terms whose ``"loss"``
entry is optimised; ``predict`` returns class probabilities B x (K + 1) x S x S (channel 0 = background) and
accepts user prompts where the method stays promptable.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..backbones.base import Backbone, Features, LayerRequest
from ..errors import ConfigError
from .options import typed_fields


@dataclasses.dataclass
class MethodConfig:
    """Options shared by every method; each method subclasses this with its own fields, whose annotations give their
    types and whose ``options.option`` metadata their allowed values (checked by ``config_from_dict``)."""

    def check(self) -> None:
        """Checks that relate several fields (ConfigError naming them); ``config_from_dict`` calls it once every field
        has been coerced and checked on its own. None here."""


def config_from_dict(cls: type, values: dict[str, Any] | None, prefix: str = "method.options.") -> Any:
    """Build config dataclass ``cls`` from a dict: each value coerced to its field's type (strings from ``--set``
    parsed as YAML) and checked against the field's allowed values, then ``check``; unknown keys are refused with
    the list of valid ones. Errors are ConfigError naming ``prefix`` + the key, the value and what is allowed."""
    config = cls(**typed_fields(cls, dict(values or {}), prefix))
    if isinstance(config, MethodConfig):
        config.check()
    return config


class Method(nn.Module):
    """Base class of every method (five papers and the baselines)."""

    name: ClassVar[str] = "base"
    config_class: ClassVar[type] = MethodConfig
    needs_encoder_grad: ClassVar[bool] = False  # True: trains through the encoder (no embedding cache)
    needs_intermediates: ClassVar[bool] = False  # True: ``features.intermediates`` must be filled
    max_classes: ClassVar[int | None] = 1  # foreground classes handled natively; None = any number
    trainable: ClassVar[bool] = True  # False for zero-shot baselines
    promptable: ClassVar[bool] = False  # ``predict`` accepts user points/boxes
    prompt_kinds: ClassVar[tuple[str, ...]] = ()  # the user prompts ``predict`` takes: "points", "boxes"
    uses_backbone: ClassVar[bool] = True
    presets: ClassVar[dict[str, str]] = {}
    """Purpose -> bundled preset (``samadapt/config/presets/<preset>.yaml``) that runs this method: ``"cpu"`` (sized
    for a 2-core CPU on the bundled backbone; the benchmark's and demo's setting), ``"paper"`` (the paper's setting)
    and any other purpose the method has (``"oracle"``, ``"tiny"``, ...)."""
    rescorings: ClassVar[dict[str, tuple[str, ...]]] = {}
    """Name -> overrides under which the benchmark's accuracy part also scores each trained model of this method,
    its weights unchanged (a row ``<label>-<name>``; e.g. H-SAM's stages alone)."""
    ablations: ClassVar[dict[str, tuple[str, ...]]] = {}
    """Name -> overrides of the paper's ablation: the accuracy part trains the method again with them, same budget
    (a row ``<label>-<name>``; e.g. HeterSAM without its fusion module)."""
    benchmark_parts: ClassVar[tuple[str, ...]] = ()
    """Parts of ``samadapt benchmark`` that measure this method by default, from its ``"cpu"`` preset: ``"latency"``
    (per-image prediction time; the volume part accepts the same methods) and ``"cost"`` (training step time)."""
    export_refusal: ClassVar[str | None] = None
    """Why ``predict`` does not export to one ONNX graph with a dynamic batch (the reason ``samadapt export`` prints);
    None: it exports, and ONNX Runtime matches PyTorch on another batch size (tests/methods/test_contract.py)."""
    simulates_clicks: ClassVar[bool] = False
    """True where the method refines with corrective clicks simulated from the ground truth (``clicks_output``):
    ``samadapt predict --clicks`` / ``evaluate dg --clicks`` and click validation (``validation_clicks``)."""
    frozen_prompts: ClassVar[tuple[str, ...]] = ()
    """Prompt kinds this method gives a *frozen* SAM decoder (ProMISe: its APM's points); ``backbone_note`` warns
    when the backbone's decoder was not trained with them (``Backbone.trained_prompts``)."""
    split_export: ClassVar[bool] = False
    """True where ``predict`` loops or chooses prompts in Python (so it is not one graph) but its heavy first part,
    ``encode_image``, is: the fast runtimes then run that part as its own graph and ``predict_encoded`` the rest in
    PyTorch (``samadapt.engine.split_export``; checked against PyTorch in tests/engine/test_split_export.py)."""

    def __init__(self, backbone: Backbone | None, config: MethodConfig, num_classes: int = 1):
        super().__init__()
        if self.max_classes is not None and num_classes > self.max_classes:
            raise ConfigError(f"method {self.name!r} handles {self.max_classes} foreground class(es), got {num_classes}")
        self.backbone = backbone
        self.config = config
        self.num_classes = num_classes

    # --- what the engine asks ----------------------------------------------------------------------------------
    @property
    def input_size(self) -> int:
        return self.backbone.input_size

    def trainable_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        """The parameters the optimiser updates and checkpoints store (name, parameter)."""
        return ((n, p) for n, p in self.named_parameters() if p.requires_grad)

    def param_groups(self, lr: float) -> list[dict]:
        """Optimiser parameter groups; override to give parts their own learning rate."""
        return [{"params": [p for _, p in self.trainable_parameters()], "lr": lr}]

    @property
    def intermediates(self) -> LayerRequest:
        """The intermediate maps ``features`` asks the backbone (and the embedding cache) for: False (none), True
        (the backbone's default layers), or a role / layer indices (``Backbone.resolve_layers``)."""
        return self.needs_intermediates

    def features(self, batch: dict) -> Features:
        """The batch's encoder outputs: from the cache when present, else computed now."""
        if "features" in batch:
            return batch["features"]
        x = self.backbone.preprocess(batch["image"])
        if self.needs_encoder_grad and self.training:
            return self.backbone.encode(x, intermediates=self.intermediates)
        with torch.no_grad():
            return self.backbone.encode(x, intermediates=self.intermediates).detach()

    def forward(self, batch: dict) -> dict[str, Tensor]:
        raise NotImplementedError

    def loss(self, output: dict[str, Tensor], batch: dict) -> dict[str, Tensor]:
        raise NotImplementedError

    def predict(self, batch: dict) -> Tensor:
        """Class probabilities B x (K + 1) x S x S; the default runs ``forward`` and ``output_probabilities``."""
        return self.output_probabilities(self.forward(batch))

    def validation_predict(self, batch: dict) -> Tensor:
        """The probabilities that validation during training scores (``engine.validation``): ``predict`` unless the
        method declares a cheaper named validation mode (DeSAM's ``val_mode``)."""
        return self.predict(batch)

    def output_probabilities(self, output: dict[str, Tensor]) -> Tensor:
        """Turn ``forward`` output into probabilities B x (K + 1) x S x S (``logits`` entry, sigmoid or softmax)."""
        return logits_to_probabilities(upsample_to(output["logits"], self.input_size))

    @property
    def validation_clicks(self) -> int:
        """Simulated clicks per slice in validation and model selection (0: plain ``forward``/``predict``)."""
        return 0

    def clicks_output(self, batch: dict, clicks: int) -> dict[str, Tensor]:
        """``forward``-like output after ``clicks`` corrective clicks simulated from ``batch["label"]`` (methods with
        ``simulates_clicks``); ``output_probabilities`` turns it into probabilities."""
        raise ConfigError(f"method {self.name!r} does not refine with simulated clicks (--clicks / validation_clicks)")

    def backbone_note(self) -> str | None:
        """A warning when this method prompts a frozen decoder with kinds the backbone's decoder was not trained
        with (``frozen_prompts`` against ``Backbone.trained_prompts``); None when they fit."""
        if self.backbone is None:
            return None
        trained = self.backbone.trained_prompts
        missing = [kind for kind in self.frozen_prompts if kind not in trained]
        if not missing:
            return None
        return (f"{self.name} prompts the frozen mask decoder with {' and '.join(missing)}, but backbone "
                f"{self.backbone.name!r} was trained with {' and '.join(trained)} only, so the prompts barely steer "
                f"it; choose a backbone trained with {' and '.join(missing)} (e.g. --set backbone.name=mobilesam)")

    def why_not_exportable(self) -> str | None:
        """Why this model, as configured, cannot be exported to ONNX (None: it can); ``export_refusal`` unless the
        method's options decide it."""
        return self.export_refusal

    @property
    def image_encoder_module(self) -> nn.Module | None:
        """The module whose forward is this model's once-per-image encoding in PyTorch (what the latency benchmark
        times as the encoder): the frozen backbone's image encoder, or the method's own (LoRA) copy; None without a
        foundation backbone."""
        return getattr(self.backbone, "image_encoder", None) if self.uses_backbone else None

    def encode_image(self, image: Tensor) -> tuple[Tensor, ...]:
        """The once-per-image part of ``predict`` as tensors: image B x 3 x S x S in [0, 1] -> (embedding
        B x C x h x w, *intermediates B x C_i x h_i x w_i), the frozen backbone's ``Features`` for ``intermediates``."""
        features = self.backbone.encode(self.backbone.preprocess(image), intermediates=self.intermediates)
        return (features.embedding, *features.intermediates)

    def predict_encoded(self, batch: dict, encoded: tuple[Tensor, ...]) -> Tensor:
        """``predict(batch)`` given ``encoded = encode_image(batch["image"])`` (computed elsewhere, e.g. in ONNX
        Runtime): probabilities B x (K + 1) x S x S."""
        return self.predict({**batch, "features": Features(encoded[0], list(encoded[1:]))})

    def on_epoch_start(self, epoch: int, num_epochs: int) -> None:
        """Hook for epoch-dependent behaviour (loss schedules); the engine calls it."""

    def set_fixed_inputs(self, fixed: bool) -> str | None:
        """The engine says, before training, whether every training slice's input is the same in each epoch (no
        image-space augmentation), and False after it; a method that reuses per-slice work across epochs turns that
        on or off and returns a line for the log. None here."""
        return None


def upsample_to(logits: Tensor, size: int) -> Tensor:
    """Bilinearly resize B x C x h x w logits to B x C x size x size (no-op when already that size)."""
    if logits.shape[-1] == size and logits.shape[-2] == size:
        return logits
    return F.interpolate(logits, size=(size, size), mode="bilinear", align_corners=False)


def logits_to_probabilities(logits: Tensor) -> Tensor:
    """One-channel logits -> [1 - p, p] (sigmoid); K + 1 channels -> softmax. Output B x (K + 1) x H x W."""
    if logits.shape[1] == 1:
        p = torch.sigmoid(logits)
        return torch.cat([1 - p, p], dim=1)
    return torch.softmax(logits, dim=1)


def resize_labels(labels: Tensor, size: int) -> Tensor:
    """Nearest-resize an int label map B x H x W to B x size x size."""
    if labels.shape[-1] == size and labels.shape[-2] == size:
        return labels
    return F.interpolate(labels[:, None].float(), size=(size, size), mode="nearest")[:, 0].long()
