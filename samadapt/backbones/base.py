"""The backbone interface: a SAM-family image encoder, prompt encoder and mask decoder behind one API.

Image convention: the data pipeline hands the backbone images as ``B x 3 x S x S`` floats in [0, 1], already
resized (longest side) and zero-padded (bottom/right) to ``S = input_size``. ``preprocess`` turns those into
what the encoder expects; ``encode`` returns the final embedding plus, on request, intermediate feature maps
taken with forward hooks on the backbone's own modules (never a forked encoder).

Intermediate layers: ``layer_modules()`` lists every encoder layer whose output can be taken (ViT blocks, TinyViT
stages), with ``layer_widths``. A method asks for the layers it needs by index or by role (``resolve_layers``):

- ``"default"``: the backbone's own choice (``intermediate_layers``; what ``intermediates=True`` gives).
- ``"stage_ends"``: the four stage outputs. SAM ViT-B/L/H: the four global-attention blocks, which close the
  encoder's four equal stages (ViT-B 2, 5, 8, 11 = the papers' blocks 3/6/9/12); TinyViT (LiteMedSAM): its four
  stages 0-3; the tiny test ViT: its four blocks.
- ``"early_stages"`` / ``"late_stages"``: the first / last three of those (ViT-B 2, 5, 8 = DeSAM's 3/6/9 and
  5, 8, 11 = ProMISe's 6/9/12; TinyViT stages 0-2 / 1-3).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence, Union

import torch
from torch import Tensor, nn

from ..errors import ConfigError


@dataclass
class Features:
    """Encoder outputs for a batch.

    ``embedding``: B x 256 x h x w (h x w = ``Backbone.embed_grid``).
    ``intermediates``: NCHW maps, one per ``Backbone.intermediate_widths`` entry, B x C_i x h_i x w_i.
    """

    embedding: Tensor
    intermediates: list[Tensor] = field(default_factory=list)

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> "Features":
        return Features(
            self.embedding.to(device=device, dtype=dtype),
            [t.to(device=device, dtype=dtype) for t in self.intermediates],
        )

    def detach(self) -> "Features":
        return Features(self.embedding.detach(), [t.detach() for t in self.intermediates])

    def index(self, idx: Sequence[int] | slice | Tensor) -> "Features":
        return Features(self.embedding[idx], [t[idx] for t in self.intermediates])

    @staticmethod
    def stack(items: Sequence["Features"]) -> "Features":
        """Concatenate per-sample features (each with batch 1 or unbatched C x h x w) into one batch."""

        def cat(ts: Sequence[Tensor]) -> Tensor:
            return torch.cat([t if t.dim() == 4 else t.unsqueeze(0) for t in ts], dim=0)

        n = len(items[0].intermediates)
        return Features(cat([f.embedding for f in items]), [cat([f.intermediates[i] for f in items]) for i in range(n)])


@dataclass(frozen=True)
class EncoderStep:
    """One step of an image encoder's forward: ``run(x)`` maps the previous step's output to the next; ``modules``
    are the names (inside the encoder; "" = all of it) of the submodules and parameters it uses."""

    modules: tuple[str, ...]
    run: Callable[[Tensor], Tensor]


LayerRequest = Union[bool, str, Sequence[int], None]
"""What a caller asks ``Backbone.encode`` for: False/None (no intermediates), True (the default layers), a role
name or layer indices (see the module docstring)."""


class Backbone(nn.Module):
    """A SAM-family model split into ``image_encoder``, ``prompt_encoder`` and ``mask_decoder``.

    Subclasses set the modules and the class attributes below, implement ``layer_modules`` and
    ``_hook_output_to_nchw``, and the classmethod ``build`` that makes one (``build_backbone`` calls it).
    ``weights_id`` identifies the weights (a SHA-256 of the checkpoint file, or
    ``random-<seed>``) so that checkpoints and cached embeddings can refuse to mix backbones.
    ``intermediate_layers`` (default selection) and ``stage_end_layers`` index ``layer_modules()``;
    ``intermediate_widths`` are the widths of the default selection.
    """

    name: str = "base"
    input_size: int = 1024
    embed_dim: int = 256
    embed_grid: tuple[int, int] = (64, 64)
    layer_widths: tuple[int, ...] = ()
    intermediate_layers: tuple[int, ...] = ()
    stage_end_layers: tuple[int, ...] = ()
    lora_targets: tuple[str, ...] = ()
    """fnmatch patterns (over ``image_encoder`` module names) of the fused attention ``qkv`` ``nn.Linear`` layers that
    the LoRA methods adapt (H-SAM, SAMed, M-SAM; their ``lora_targets`` option overrides it); empty: none declared."""
    trained_prompts: tuple[str, ...] = ("points", "boxes", "masks")
    """The prompt kinds the released prompt encoder and mask decoder were trained with (SAM's three); a frozen
    decoder follows only these (``Method.backbone_note``)."""
    pixel_mean: Tensor
    pixel_std: Tensor

    def __init__(
        self,
        image_encoder: nn.Module,
        prompt_encoder: nn.Module,
        mask_decoder: nn.Module,
        weights_id: str,
        pixel_mean: Sequence[float] = (0.0, 0.0, 0.0),
        pixel_std: Sequence[float] = (1.0, 1.0, 1.0),
        pixel_scale: float = 1.0,
    ):
        super().__init__()
        self.image_encoder = image_encoder
        self.prompt_encoder = prompt_encoder
        self.mask_decoder = mask_decoder
        self.weights_id = weights_id
        self.pixel_scale = pixel_scale
        self.register_buffer("pixel_mean", torch.tensor(pixel_mean, dtype=torch.float32).view(1, 3, 1, 1), False)
        self.register_buffer("pixel_std", torch.tensor(pixel_std, dtype=torch.float32).view(1, 3, 1, 1), False)

    # --- interface -------------------------------------------------------------------------------------------
    @property
    def low_res_size(self) -> int:
        """Side of the mask decoder's low-resolution logits (4 x the embedding grid)."""
        return 4 * self.embed_grid[0]

    @classmethod
    def build(cls, checkpoint: str | None = None, **kwargs) -> "Backbone":
        """A ready backbone, with the weights of ``checkpoint`` (a path) or the backbone's own."""
        raise NotImplementedError

    def layer_modules(self) -> list[nn.Module]:
        """Every encoder layer whose output can be an intermediate map, in encoder order (``layer_widths``)."""
        raise NotImplementedError

    def _hook_output_to_nchw(self, index: int, output: Tensor) -> Tensor:
        """Convert the output of layer ``index`` (tokens, NHWC or NCHW) to NCHW."""
        raise NotImplementedError

    def layer_roles(self) -> dict[str, tuple[int, ...]]:
        """Role name -> layer indices (see the module docstring)."""
        ends = tuple(self.stage_end_layers)
        return {"default": tuple(self.intermediate_layers), "stage_ends": ends, "early_stages": ends[:-1],
                "late_stages": ends[1:]}

    def resolve_layers(self, request: LayerRequest = True) -> tuple[int, ...]:
        """Layer indices for ``request`` (True / a role / indices; False or None: none). ConfigError if unknown."""
        if request is None or request is False:
            return ()
        if request is True:
            return tuple(self.intermediate_layers)
        if isinstance(request, str):
            roles = self.layer_roles()
            if request not in roles:
                raise ConfigError(f"backbone {self.name} has no intermediate-layer role {request!r}; "
                                  f"roles: {', '.join(roles)}, or a list of layer indices")
            return roles[request]
        layers = tuple(int(i) for i in request)
        n = len(self.layer_widths)
        bad = [i for i in layers if not 0 <= i < n]
        if bad:
            raise ConfigError(f"backbone {self.name} has layers 0..{n - 1}, got intermediate layer(s) {bad}")
        return layers

    def widths_of(self, request: LayerRequest = True) -> tuple[int, ...]:
        """Channel widths of the maps ``request`` selects, in order."""
        return tuple(self.layer_widths[i] for i in self.resolve_layers(request))

    @property
    def intermediate_widths(self) -> tuple[int, ...]:
        """Widths of the default intermediate maps."""
        return self.widths_of(True)

    def intermediate_modules(self, request: LayerRequest = True) -> list[nn.Module]:
        """Modules whose outputs are the maps ``request`` selects, in order."""
        modules = self.layer_modules()
        return [modules[i] for i in self.resolve_layers(request)]

    def preprocess(self, images: Tensor) -> Tensor:
        """B x 3 x S x S in [0, 1] -> the encoder's input (scaled and normalised), same shape."""
        return (images * self.pixel_scale - self.pixel_mean) / self.pixel_std

    def encode(self, x: Tensor, intermediates: LayerRequest = False) -> Features:
        """Encode preprocessed images ``x`` (B x 3 x S x S) into ``Features``.

        ``intermediates`` selects the maps captured with forward hooks (True: the default layers; a role or layer
        indices: those, in the order asked). Gradients flow if the caller enables them (LoRA methods); wrap in
        ``torch.no_grad`` for frozen use.
        """
        if x.shape[-2:] != (self.input_size, self.input_size):
            raise ValueError(f"{self.name} expects inputs of {self.input_size}x{self.input_size}, got {tuple(x.shape)}")
        layers = self.resolve_layers(intermediates)
        modules = self.layer_modules() if layers else []
        captured: dict[int, Tensor] = {}
        handles = [modules[i].register_forward_hook(
            lambda _m, _inp, out, i=i: captured.__setitem__(i, self._hook_output_to_nchw(i, out)))
            for i in sorted(set(layers))]
        try:
            embedding = self.image_encoder(x)
        finally:
            for h in handles:
                h.remove()
        return Features(embedding, [captured[i] for i in layers])

    def encoder_steps(self, encoder: nn.Module) -> list[EncoderStep]:
        """``encoder`` (this backbone's ``image_encoder`` or a copy of it) as consecutive steps whose composition is
        ``encoder(x)``: B x 3 x S x S -> ... -> the embedding B x C x h x w. Methods that adapt later layers run the
        frozen steps before them once per slice (``samadapt.methods.lora_encoder``). Default: one step."""
        return [EncoderStep(("",), encoder)]

    def encoder_parameters(self) -> list[nn.Parameter]:
        return list(self.image_encoder.parameters())

    def freeze(self, encoder: bool = True, prompt_encoder: bool = True, mask_decoder: bool = True) -> "Backbone":
        for flag, module in ((encoder, self.image_encoder), (prompt_encoder, self.prompt_encoder),
                             (mask_decoder, self.mask_decoder)):
            if flag:
                module.requires_grad_(False)
        return self

    def describe(self) -> dict:
        """A JSON-able summary for manifests and ``samadapt info``."""
        return {
            "name": self.name,
            "weights_id": self.weights_id,
            "input_size": self.input_size,
            "embed_grid": list(self.embed_grid),
            "intermediate_widths": list(self.intermediate_widths),
            "intermediate_layers": list(self.intermediate_layers),
            "layer_roles": {k: list(v) for k, v in self.layer_roles().items()},
            "parameters": {
                "image_encoder": sum(p.numel() for p in self.image_encoder.parameters()),
                "prompt_encoder": sum(p.numel() for p in self.prompt_encoder.parameters()),
                "mask_decoder": sum(p.numel() for p in self.mask_decoder.parameters()),
            },
        }


def file_sha256(path: str | Path, chunk: int = 1 << 20) -> str:
    """SHA-256 hex digest of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while data := handle.read(chunk):
            digest.update(data)
    return digest.hexdigest()
