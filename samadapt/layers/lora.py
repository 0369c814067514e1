"""LoRA (low-rank adaptation) for ``nn.Linear`` layers, with SAMed's q/v-only variant for SAM's fused ``qkv``.

``apply_lora`` replaces the selected ``nn.Linear`` modules by wrappers that compute
``base(x) + scaling * x A^T B^T`` with ``A`` (rank x in) kaiming-uniform(a=sqrt(5)) and ``B`` (out x rank) zero, so a
freshly wrapped model computes exactly what the base model did. ``scaling = alpha / rank``; the default
``alpha = rank`` gives SAMed's unscaled update. For a fused attention projection named ``qkv`` (out = 3 x in) the
update goes to the q and v slices only (SAMed, METHODS.md section 0): ``qkv(x)[..., :d] += s B_q A_q x`` and
``qkv(x)[..., -d:] += s B_v A_v x``.

A wrapper keeps the base ``weight``/``bias`` as its own parameters, so the base keys of ``state_dict()`` do not change
(``blocks.0.attn.qkv.weight`` stays) and only ``...qkv.lora_A_q`` etc. are added. ``lora_state_dict`` returns the
adapter tensors alone; ``save_adapter``/``load_adapter`` store them as safetensors with a JSON manifest beside;
``merge_lora`` folds them into plain ``nn.Linear`` layers for inference.
"""

from __future__ import annotations

import json
import math
import os
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..io_utils import atomic_path, atomic_write_text
from ..errors import CheckpointError, ConfigError
from ..state_dicts import load_state_checked, read_sidecar_manifest, short_list

ADAPTER_FORMAT = "samadapt-lora/1"


class _LoRABase(nn.Module):
    """Shared parts: the frozen base weight/bias (same Parameter objects as the wrapped Linear), rank and scaling."""

    kind = "base"

    def __init__(self, base: nn.Linear, rank: int, alpha: float | None):
        super().__init__()
        if rank < 1:
            raise ConfigError(f"LoRA rank must be >= 1, got {rank}")
        self.in_features = base.in_features
        self.out_features = base.out_features
        self.rank = int(rank)
        self.alpha = float(rank if alpha is None else alpha)
        self.scaling = self.alpha / self.rank
        self.weight = base.weight
        self.bias = base.bias

    def _new_pair(self, out_features: int) -> tuple[nn.Parameter, nn.Parameter]:
        like = self.weight
        a = nn.Parameter(torch.empty(self.rank, self.in_features, device=like.device, dtype=like.dtype))
        b = nn.Parameter(torch.zeros(out_features, self.rank, device=like.device, dtype=like.dtype))
        nn.init.kaiming_uniform_(a, a=math.sqrt(5))
        return a, b

    def lora_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        for name, param in self.named_parameters(recurse=False):
            if name.startswith("lora_"):
                yield name, param

    def delta_weight(self) -> Tensor:
        """The dense update ``scaling * B @ A`` laid out like ``weight`` (out x in)."""
        raise NotImplementedError

    def merged(self) -> nn.Linear:
        """A plain ``nn.Linear`` whose weight is ``weight + delta_weight()``."""
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                           device=self.weight.device, dtype=self.weight.dtype)
        with torch.no_grad():
            linear.weight.copy_(self.weight + self.delta_weight().to(self.weight.dtype))
            if self.bias is not None:
                linear.bias.copy_(self.bias)
        linear.weight.requires_grad_(self.weight.requires_grad)
        if self.bias is not None:
            linear.bias.requires_grad_(self.bias.requires_grad)
        return linear

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, "
                f"alpha={self.alpha:g}, kind={self.kind}")


class LoRALinear(_LoRABase):
    """``nn.Linear`` + a rank-``rank`` update on the whole output."""

    kind = "linear"

    def __init__(self, base: nn.Linear, rank: int, alpha: float | None = None):
        super().__init__(base, rank, alpha)
        self.lora_A, self.lora_B = self._new_pair(self.out_features)

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight, self.bias) + self.scaling * F.linear(F.linear(x, self.lora_A), self.lora_B)

    def delta_weight(self) -> Tensor:
        return self.scaling * (self.lora_B @ self.lora_A)


class LoRAQKV(_LoRABase):
    """A fused ``qkv`` Linear (out = 3 x dim) with LoRA on the q slice ``[:dim]`` and the v slice ``[-dim:]``."""

    kind = "qkv_qv"

    def __init__(self, base: nn.Linear, rank: int, alpha: float | None = None):
        super().__init__(base, rank, alpha)
        if self.out_features % 3:
            raise ConfigError(f"a fused qkv layer needs out_features divisible by 3, got {self.out_features}")
        self.dim = self.out_features // 3
        self.lora_A_q, self.lora_B_q = self._new_pair(self.dim)
        self.lora_A_v, self.lora_B_v = self._new_pair(self.dim)

    def forward(self, x: Tensor) -> Tensor:
        q, k, v = F.linear(x, self.weight, self.bias).split(self.dim, dim=-1)
        dq = F.linear(F.linear(x, self.lora_A_q), self.lora_B_q)
        dv = F.linear(F.linear(x, self.lora_A_v), self.lora_B_v)
        return torch.cat([q + self.scaling * dq, k, v + self.scaling * dv], dim=-1)

    def delta_weight(self) -> Tensor:
        dq = self.lora_B_q @ self.lora_A_q
        dv = self.lora_B_v @ self.lora_A_v
        return self.scaling * torch.cat([dq, torch.zeros_like(dq), dv], dim=0)


_KINDS: dict[str, Callable[..., _LoRABase]] = {"linear": LoRALinear, "qkv_qv": LoRAQKV}


def _is_fused_qkv(name: str, layer: nn.Linear) -> bool:
    return name.rsplit(".", 1)[-1] == "qkv" and layer.out_features == 3 * layer.in_features


def _set_submodule(root: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, new)


def lora_modules(module: nn.Module) -> dict[str, _LoRABase]:
    """Name -> LoRA wrapper for every wrapped layer inside ``module``."""
    return {name: m for name, m in module.named_modules() if isinstance(m, _LoRABase)}


def apply_lora(
    module: nn.Module,
    targets: list[str] | tuple[str, ...] | str,
    rank: int,
    alpha: float | None = None,
    qv_only_for_qkv: bool = True,
    freeze_base: bool = True,
) -> list[str]:
    """Wrap the ``nn.Linear`` layers of ``module`` whose names match ``targets`` (fnmatch patterns); return their names.

    Example (SAMed): ``apply_lora(backbone, ["image_encoder.blocks.*.attn.qkv"], rank=4)``. A layer named ``qkv``
    with out = 3 x in gets ``LoRAQKV`` (q and v only) unless ``qv_only_for_qkv=False``; others get ``LoRALinear``.
    ``alpha`` defaults to ``rank`` (scaling 1, as SAMed). Raises ``ConfigError`` when a pattern matches no
    ``nn.Linear`` (the message lists some that exist) or matches a layer that already has LoRA.

    ``freeze_base=True`` sets ``requires_grad=False`` on every parameter of ``module`` that is not a LoRA parameter
    (SAMed freezes the whole image encoder, position embeddings and neck included). Pass the part you adapt, or
    re-enable what should train afterwards (e.g. ``backbone.mask_decoder.requires_grad_(True)``).
    """
    if int(rank) < 1:
        raise ConfigError(f"LoRA rank must be >= 1, got {rank}")
    patterns = [targets] if isinstance(targets, str) else list(targets)
    if not patterns:
        raise ConfigError("apply_lora needs at least one target pattern")
    named = dict(module.named_modules())
    wrapped_already = lora_modules(module)
    linears = {n: m for n, m in named.items() if n and isinstance(m, nn.Linear)}
    chosen: list[str] = []
    for pattern in patterns:
        hits = [n for n in linears if fnmatchcase(n, pattern)]
        again = [n for n in wrapped_already if fnmatchcase(n, pattern)]
        if again:
            raise ConfigError(f"LoRA target {pattern!r} matches layers that already have LoRA: {', '.join(again[:5])}")
        if not hits:
            sample = ", ".join(list(linears)[:8]) or "(none)"
            raise ConfigError(f"LoRA target {pattern!r} matches no nn.Linear in {type(module).__name__}; "
                              f"Linear layers include: {sample}")
        chosen.extend(n for n in hits if n not in chosen)
    wrappers = {}
    for name in chosen:  # build all wrappers first: a bad layer leaves the module untouched
        layer = linears[name]
        cls = LoRAQKV if (qv_only_for_qkv and _is_fused_qkv(name, layer)) else LoRALinear
        wrappers[name] = cls(layer, rank, alpha)
    for name, wrapper in wrappers.items():
        _set_submodule(module, name, wrapper)
    if freeze_base:
        lora_ids = {id(p) for w in lora_modules(module).values() for _, p in w.lora_parameters()}
        for param in module.parameters():
            if id(param) not in lora_ids:
                param.requires_grad_(False)
    return chosen


def lora_parameters(module: nn.Module) -> list[nn.Parameter]:
    """The LoRA parameters of ``module`` (what an optimizer trains)."""
    return [p for w in lora_modules(module).values() for _, p in w.lora_parameters()]


def lora_state_dict(module: nn.Module) -> dict[str, Tensor]:
    """Adapter tensors only, keyed by their full names in ``module`` (e.g. ``...attn.qkv.lora_A_q``)."""
    return {f"{name}.{pname}": p.detach() for name, w in lora_modules(module).items()
            for pname, p in w.lora_parameters()}


def lora_config(module: nn.Module) -> dict[str, Any]:
    """What ``load_adapter`` needs to re-create the wrappers: per layer kind, rank, alpha; plus the common values."""
    layers = {name: {"kind": w.kind, "rank": w.rank, "alpha": w.alpha} for name, w in lora_modules(module).items()}
    ranks = {v["rank"] for v in layers.values()}
    alphas = {v["alpha"] for v in layers.values()}
    return {
        "format": ADAPTER_FORMAT,
        "rank": ranks.pop() if len(ranks) == 1 else None,
        "alpha": alphas.pop() if len(alphas) == 1 else None,
        "targets": list(layers),
        "layers": layers,
    }


def _manifest_path(path: Path) -> Path:
    return path.with_suffix(".json")


def save_adapter(module: nn.Module, path: str | os.PathLike, manifest: dict | None = None) -> Path:
    """Write the adapter tensors to ``path`` (.safetensors) and ``<path>.json`` beside it, each atomically.

    The JSON holds ``manifest`` (e.g. base model id and weights hash) plus ``"lora"``: rank, alpha, targets and
    per-layer settings. When ``module`` has a ``weights_id`` (a Backbone), it is recorded as ``base_weights_id``
    unless the manifest sets it. Returns the .safetensors path.
    """
    from safetensors.torch import save_file

    tensors = {k: v.cpu().contiguous() for k, v in lora_state_dict(module).items()}
    if not tensors:
        raise ConfigError(f"{type(module).__name__} has no LoRA layers to save; call apply_lora first")
    path = Path(path)
    if path.suffix != ".safetensors":
        path = path.with_name(path.name + ".safetensors")
    full = dict(manifest or {})
    if "base_weights_id" not in full and isinstance(getattr(module, "weights_id", None), str):
        full["base_weights_id"] = module.weights_id
    if "base_model" not in full and isinstance(getattr(module, "name", None), str):
        full["base_model"] = module.name
    full["lora"] = lora_config(module)
    text = json.dumps(full, indent=2, default=str) + "\n"
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={"format": ADAPTER_FORMAT})
    atomic_write_text(_manifest_path(path), text)
    return path


def read_adapter_manifest(path: str | os.PathLike) -> dict:
    """The JSON manifest beside an adapter file; ``CheckpointError`` naming the file when missing or invalid."""
    return read_sidecar_manifest(path, kind="adapter")


def load_adapter(module: nn.Module, path: str | os.PathLike, check_base: bool = True) -> dict:
    """Load an adapter written by ``save_adapter`` into ``module``; return its manifest.

    If ``module`` has no LoRA layers yet they are created from the manifest (same names, kinds, ranks, alphas, base
    frozen). Missing, unexpected or mis-shaped adapter keys raise ``CheckpointError`` listing them. With
    ``check_base`` and a ``weights_id`` on both sides, an adapter trained on other base weights is refused.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: adapter file not found")
    manifest = read_adapter_manifest(path)
    base_id = manifest.get("base_weights_id")
    own_id = getattr(module, "weights_id", None)
    if check_base and isinstance(base_id, str) and isinstance(own_id, str) and base_id != own_id:
        raise CheckpointError(f"{path}: adapter was trained on base weights {base_id}, this model has {own_id}")
    try:
        state = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: not a readable safetensors file ({exc})") from exc
    if not lora_modules(module):
        layers = manifest.get("lora", {}).get("layers", {})
        if not layers:
            raise CheckpointError(f"{path}: manifest has no LoRA layer table and the model has no LoRA layers")
        named = dict(module.named_modules())
        absent = [n for n in layers if not isinstance(named.get(n), nn.Linear)]
        if absent:
            raise CheckpointError(f"{path}: adapter targets that are not nn.Linear layers of this model: "
                                  f"{short_list(absent)}")
        for name, spec in layers.items():
            cls = _KINDS.get(spec.get("kind"))
            if cls is None:
                raise CheckpointError(f"{path}: unknown LoRA layer kind {spec.get('kind')!r} for {name}")
            _set_submodule(module, name, cls(named[name], int(spec["rank"]), float(spec["alpha"])))
        lora_ids = {id(p) for p in lora_parameters(module)}
        for param in module.parameters():
            if id(param) not in lora_ids:
                param.requires_grad_(False)
    load_state_checked(module, state, path, expected=lora_state_dict(module))
    return manifest


def merge_lora(module: nn.Module) -> list[str]:
    """Fold every LoRA update into its base weight and put plain ``nn.Linear`` layers back; return their names.

    Outputs are unchanged (up to float rounding). Base keys of ``state_dict()`` are the same before and after.
    """
    names = list(lora_modules(module))
    for name, wrapper in lora_modules(module).items():
        _set_submodule(module, name, wrapper.merged())
    return names
