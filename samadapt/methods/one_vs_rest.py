"""Run a one-class method on K-class data: one head per class, trained jointly, combined at prediction."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..backbones.base import Backbone
from .base import Method, MethodConfig


class OneVsRest(Method):
    """K copies of a binary method; head k sees ``label == k`` as foreground.

    Training sums the K losses. Prediction turns the K foreground probabilities p_k into class probabilities
    ``[prod_k (1 - p_k), p_1, ..., p_K]`` normalised to sum to 1, so argmax picks the most confident class and
    background wins where every head says no.
    """

    max_classes = None

    def __init__(self, cls: type[Method], backbone: Backbone | None, config: MethodConfig, num_classes: int):
        super().__init__(backbone, config, num_classes)
        self.name = f"{cls.name}"
        self.base_class = cls
        self.needs_encoder_grad = cls.needs_encoder_grad
        self.needs_intermediates = cls.needs_intermediates
        self.trainable = cls.trainable
        self.uses_backbone = cls.uses_backbone
        self.heads = nn.ModuleList(cls(backbone, config, 1) for _ in range(num_classes))

    @property
    def input_size(self) -> int:
        return self.heads[0].input_size

    @property
    def intermediates(self):
        return self.heads[0].intermediates

    def features(self, batch: dict):
        return self.heads[0].features(batch)

    def _binary_batch(self, batch: dict, k: int) -> dict:
        out = dict(batch)
        if "label" in batch:
            out["label"] = (batch["label"] == k).long()
        return out

    def _with_features(self, batch: dict) -> dict:
        if self.uses_backbone and "features" not in batch:
            batch = dict(batch, features=self.features(batch))
        return batch

    def forward(self, batch: dict) -> dict[str, Tensor]:
        batch = self._with_features(batch)
        outputs = {}
        for k, head in enumerate(self.heads, start=1):
            for name, value in head(batch).items():
                outputs[f"{k}/{name}"] = value
        return outputs

    def loss(self, output: dict[str, Tensor], batch: dict) -> dict[str, Tensor]:
        terms: dict[str, Tensor] = {}
        total = 0.0
        for k, head in enumerate(self.heads, start=1):
            own = {n.split("/", 1)[1]: v for n, v in output.items() if n.startswith(f"{k}/")}
            head_terms = head.loss(own, self._binary_batch(batch, k))
            total = total + head_terms["loss"]
            terms.update({f"class{k}_{n}": v for n, v in head_terms.items()})
        terms["loss"] = total
        return terms

    def predict(self, batch: dict) -> Tensor:
        batch = self._with_features(batch)
        fg = [head.predict(self._binary_batch(batch, k))[:, 1:2] for k, head in enumerate(self.heads, start=1)]
        fg_t = torch.cat(fg, dim=1)
        bg = torch.prod(1 - fg_t, dim=1, keepdim=True)
        probs = torch.cat([bg, fg_t], dim=1)
        return probs / probs.sum(dim=1, keepdim=True).clamp_min(1e-8)

    def why_not_exportable(self) -> str | None:
        return self.heads[0].why_not_exportable()

    def backbone_note(self) -> str | None:
        return self.heads[0].backbone_note()

    def on_epoch_start(self, epoch: int, num_epochs: int) -> None:
        for head in self.heads:
            head.on_epoch_start(epoch, num_epochs)

    def set_fixed_inputs(self, fixed: bool) -> str | None:
        notes = [head.set_fixed_inputs(fixed) for head in self.heads]
        return notes[0] and f"{notes[0]} (each of the {len(self.heads)} one-vs-rest heads)"
