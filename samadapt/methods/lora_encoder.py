"""The LoRA methods' image encoder (H-SAM, SAMed, M-SAM) and the reuse of its frozen prefix across epochs.

``lora_encoder`` makes the method's own copy of the backbone's image encoder with LoRA on q and v; its base weights
are frozen and its BatchNorm layers (TinyViT) stay in eval mode (``keep_frozen_eval``), so the encoder computes with
the pretrained statistics in training as in evaluation.

``PrefixReuse`` runs that encoder as the backbone's ``encoder_steps``. The leading steps with no trainable parameter
(LiteMedSAM: the patch embedding and TinyViT's convolutional stage 0, about 45 % of the forward at 256 px; SAM's
ViT: the patch and position embedding) compute the same output for the same slice in every epoch, so while the
engine says the training inputs are fixed (``set_fixed_inputs(True)``: no image-space augmentation) their output is
kept in memory per slice content key (``batch["key"]``, a hash of the image) in fp32 and reused; only the steps from
the first LoRA layer on run (and back-propagate) each step. The result equals the full encoder's to fp32 rounding
(tests/methods/test_lora_encoder.py). With augmentation every epoch's image is new: the engine passes False and the
encoder runs whole. Memory: one prefix output per distinct slice (LiteMedSAM 128 x 128 x 128 floats, 8 MiB) up to
``max_mb``; beyond it new slices are computed and not kept.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..backbones.base import Backbone, EncoderStep, Features
from ..layers.lora_heads import apply_qv_lora
from .base import MethodConfig
from .lora_targets import lora_targets
from .options import option


@dataclass
class PrefixReuseConfig(MethodConfig):
    """The options of ``PrefixReuse``, shared by the LoRA methods' configs."""

    prefix_cache: bool = True
    """Reuse the frozen encoder prefix's output per slice across epochs while training without augmentation
    (exact; false: the whole encoder runs every step)."""
    prefix_cache_mb: float = option(2048.0, ge=0)
    """Memory for those outputs (MiB, per encoder: each one-vs-rest head of M-SAM has its own); slices beyond it are
    computed every step."""


def lora_encoder(backbone: Backbone, targets: list[str] | None, rank: int, method: str) -> tuple[nn.Module, list]:
    """A deep copy of ``backbone``'s image encoder with LoRA on q and v of the fused qkv layers ``targets`` (None: the
    backbone's ``lora_targets``); returns (encoder, LoRA layers). The backbone is not modified."""
    targets = lora_targets(backbone, targets, method)
    encoder = copy.deepcopy(backbone.image_encoder)
    return encoder, apply_qv_lora(encoder, targets, rank, freeze_base=True)


def keep_frozen_eval(module: nn.Module) -> None:
    """Put every BatchNorm layer of ``module`` without trainable parameters in eval mode (a frozen encoder keeps its
    pretrained running statistics instead of normalising with, and updating them from, each training batch; on 4
    MNI152 tissue slices, train-mode BatchNorm moved LiteMedSAM's embedding by 70 % of its norm, cosine 0.77)."""
    for m in module.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and not any(p.requires_grad for p in m.parameters()):
            m.eval()


class LoRAEncoderMixin:
    """What H-SAM and SAMed share: their own LoRA encoder gives the embedding. Mixed in before ``Method``;
    ``setup_lora_encoder`` (called in ``__init__``) freezes the backbone and builds ``image_encoder``,
    ``lora_layers``, ``encoder_run`` (``PrefixReuse``) and the trainable dense prompt ``no_mask_embed`` (1 x C, from
    the prompt encoder's no-mask embedding)."""

    def setup_lora_encoder(self, backbone: Backbone, config) -> None:
        backbone.freeze()
        self.image_encoder, self.lora_layers = lora_encoder(backbone, config.lora_targets, config.lora_rank, self.name)
        self.encoder_run = PrefixReuse(backbone, self.image_encoder, config.prefix_cache, config.prefix_cache_mb)
        self.no_mask_embed = nn.Parameter(backbone.prompt_encoder.no_mask_embed.weight.detach().clone())

    def features(self, batch: dict) -> Features:
        """The LoRA encoder's embedding of ``batch["image"]`` (B x C x h x w); cached features are not used, the
        frozen prefix's output is reused per ``batch["key"]`` while ``set_fixed_inputs`` says so."""
        return Features(self.encoder_run(self.backbone.preprocess(batch["image"]), batch.get("key")))

    @property
    def image_encoder_module(self) -> nn.Module:
        return self.image_encoder

    def train(self, mode: bool = True):
        """Train mode for the trainable parts; the frozen encoder's BatchNorm layers (TinyViT) stay in eval mode."""
        super().train(mode)
        keep_frozen_eval(self.image_encoder)
        return self

    def set_fixed_inputs(self, fixed: bool) -> str | None:
        return self.encoder_run.set_fixed_inputs(fixed, self.name)


def _uses(step: EncoderStep, name: str) -> bool:
    return any(not prefix or name == prefix or name.startswith(prefix + ".") for prefix in step.modules)


def frozen_prefix_length(encoder: nn.Module, steps: list[EncoderStep]) -> int:
    """How many leading ``steps`` have no trainable parameter and no active dropout (their output depends on the
    input alone); the last step (the encoder's output) always runs."""
    trainable = [n for n, p in encoder.named_parameters() if p.requires_grad]
    dropouts = [n for n, m in encoder.named_modules() if isinstance(m, nn.modules.dropout._DropoutNd) and m.p > 0]
    for i, step in enumerate(steps[:-1]):
        if any(_uses(step, n) for n in trainable + dropouts):
            return i
    return len(steps) - 1


def _stack_like(items: list[Tensor]) -> Tensor:
    """Stack per-slice tensors into B x ... laid out in memory as the first one (the prefix's own output layout,
    e.g. a permuted NCHW convolution output), so that the steps after it compute exactly as on that output."""
    first = items[0]
    order = sorted(range(first.dim()), key=lambda d: -first.stride(d))
    stacked = torch.stack([t.permute(order) for t in items])
    return stacked.permute([0] + [1 + order.index(d) for d in range(first.dim())])


class PrefixReuse:
    """Runs ``encoder`` (the method's LoRA copy) on preprocessed images, reusing the frozen prefix per slice key.

    ``__call__(x B x 3 x S x S, keys list of B content keys or None) -> embedding B x C x h x w``. A plain object, not
    a module: it holds no parameters and is not part of the method's state dict.
    """

    def __init__(self, backbone: Backbone, encoder: nn.Module, enabled: bool = True, max_mb: float = 2048):
        self.encoder = encoder
        steps = backbone.encoder_steps(encoder)
        n = frozen_prefix_length(encoder, steps)
        self.prefix, self.rest = steps[:n], steps[n:]
        self.enabled = enabled
        self.active = False
        self.max_bytes = int(max_mb * 2 ** 20)
        self.store: dict[str, Tensor] = {}
        self.bytes = self.hits = self.misses = 0

    @property
    def prefix_names(self) -> list[str]:
        return [name for step in self.prefix for name in step.modules]

    def set_fixed_inputs(self, fixed: bool, method: str) -> str | None:
        """Turn the reuse on while inputs are the same every epoch (off: the store is emptied); a line saying what
        happens, or None when the option is off or there is no frozen prefix."""
        self.active = bool(fixed and self.enabled and self.prefix)
        if not fixed:
            self.store.clear()
            self.bytes = 0
        if not (self.enabled and self.prefix):
            return None
        names = ", ".join(self.prefix_names)
        if self.active:
            return (f"{method}: the frozen encoder prefix ({names}) runs once per slice and is reused in later "
                    f"epochs (method.options.prefix_cache=false turns this off)")
        return (f"{method}: image-space augmentation changes the input every epoch, so the frozen encoder prefix "
                f"({names}) is recomputed every step (no reuse)")

    def __call__(self, x: Tensor, keys: list[str] | None = None) -> Tensor:
        if not (self.active and keys is not None and len(keys) == x.shape[0]):
            return self.encoder(x)
        missing = [i for i, k in enumerate(keys) if k not in self.store]
        computed: dict[int, Tensor] = {}
        if missing:
            with torch.no_grad():
                out = x[missing]
                for step in self.prefix:
                    out = step.run(out)
            for row, i in enumerate(missing):
                computed[i] = out[row]
                if keys[i] not in self.store and self.bytes + out[row].nbytes <= self.max_bytes:
                    self.store[keys[i]] = out[row].clone()
                    self.bytes += out[row].nbytes
        self.hits += x.shape[0] - len(missing)
        self.misses += len(missing)
        h = _stack_like([computed[i] if i in computed else self.store[k].to(x.device) for i, k in enumerate(keys)])
        for step in self.rest:
            h = step.run(h)
        return h
