"""Fast inference options for ``Predictor``: each keeps the output within a stated tolerance of the plain fp32 path.

- ``fuse_bn``: fold every eval-mode ``BatchNorm2d`` that directly follows a ``Conv2d`` in an ``nn.Sequential``
  (TinyViT's ``Conv2d_BN`` blocks, 27 in LiteMedSAM) into the convolution. Exact up to fp32 rounding.
- ``channels_last``: convolution weights and the input images in NHWC memory order (TinyViT's first stage runs
  1x1 and depthwise convolutions at full 256 px resolution; oneDNN avoids layout reorders). Exact up to rounding.
- ``merge_lora``: fold every LoRA update into its base weight (H-SAM's and M-SAM's encoders), so each adapted
  Linear is one matmul instead of three plus an add. Exact up to fp32 rounding.
- ``bf16``: bfloat16 autocast; ``"auto"`` enables it only where the device computes bf16 natively (CUDA with
  bf16, or a CPU with AVX512-BF16/AMX as oneDNN reports it); elsewhere it would be emulated and slower.

Tolerances (probabilities in [0, 1], checked for every method in tests/methods/test_contract.py
and tests/engine/test_fast_predict.py): fp32 options ``FP32_TOLERANCE``
max absolute difference; bf16 ``BF16_TOLERANCE`` max absolute difference of probabilities.

The functions patch modules of an already-built model in place (inference only; never train a fused model).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from ..errors import ConfigError
from .device import cpu_bf16_native

FP32_TOLERANCE = 1e-4
BF16_TOLERANCE = 0.05


@dataclass(frozen=True)
class FastOptions:
    """Which fast inference options a ``Predictor`` applies. ``FastOptions()`` = all on; ``EXACT`` = none."""

    fuse_bn: bool = True
    channels_last: bool = True
    merge_lora: bool = True
    bf16: str = "auto"  # auto | on | off

    def __post_init__(self):
        if self.bf16 not in ("auto", "on", "off"):
            raise ConfigError(f"fast option bf16 must be auto, on or off, got {self.bf16!r}")

    def amp(self, device: torch.device, configured: str = "none") -> str:
        """The autocast mode to run with: the configured one, or bf16 when requested/natively supported."""
        if configured != "none" or self.bf16 == "off":
            return configured
        if self.bf16 == "on" or bf16_native(device):
            return "bf16"
        return "none"


EXACT = FastOptions(fuse_bn=False, channels_last=False, merge_lora=False, bf16="off")


def bf16_native(device: torch.device) -> bool:
    """True when ``device`` computes bfloat16 matmuls/convolutions natively (not emulated in fp32)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        return cpu_bf16_native()
    return False


def resolve_amp(amp: str, device: torch.device) -> str:
    """The training/validation autocast mode for ``train.amp``: ``"auto"`` is bf16 where ``device`` computes
    bfloat16 natively (``bf16_native``) and none elsewhere; none, bf16 and fp16 are returned as given."""
    if amp != "auto":
        return amp
    return "bf16" if bf16_native(device) else "none"


def fuse_conv_bn(model: nn.Module) -> int:
    """Fold each eval-mode ``BatchNorm2d`` that follows a ``Conv2d`` inside an ``nn.Sequential`` into the conv.

    The BN is replaced by ``nn.Identity`` (module names stay, so hooks and attribute paths keep working).
    Returns the number of pairs fused. Raises ``ConfigError`` if ``model`` is in training mode.
    """
    if model.training:
        raise ConfigError("fuse_conv_bn is for inference: call model.eval() first")
    fused = 0
    for seq in model.modules():
        if not isinstance(seq, nn.Sequential):
            continue
        names = list(seq._modules)
        for first, second in zip(names, names[1:]):
            conv, bn = seq._modules[first], seq._modules[second]
            if (type(conv) is nn.Conv2d and isinstance(bn, nn.BatchNorm2d) and bn.track_running_stats
                    and bn.running_mean is not None and conv.out_channels == bn.num_features):
                seq._modules[first] = fuse_conv_bn_eval(conv, bn)
                seq._modules[second] = nn.Identity()
                fused += 1
    return fused


def conv_weights_channels_last(model: nn.Module) -> int:
    """Store every ``Conv2d`` weight in channels-last (NHWC) order; returns how many were converted."""
    n = 0
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            m.weight.data = m.weight.data.contiguous(memory_format=torch.channels_last)
            n += 1
    return n


def apply_fast_options(method: nn.Module, options: FastOptions) -> dict[str, int]:
    """Patch ``method`` (in eval mode) for ``options``; returns what was changed (counts per option)."""
    method.eval()
    done = {"fused_conv_bn": 0, "channels_last_convs": 0, "merged_lora": 0}
    if options.merge_lora:
        from ..layers.lora import merge_lora

        done["merged_lora"] = len(merge_lora(method))
    if options.fuse_bn:
        done["fused_conv_bn"] = fuse_conv_bn(method)
    if options.channels_last:
        done["channels_last_convs"] = conv_weights_channels_last(method)
    return done
