"""Residual squeeze-and-excitation U-Net blocks (DeSAM's ``UnetResSEBlock``), built from MONAI's DynUNet blocks.

- :class:`SqueezeExcite`: channel attention ``x * sigmoid(W2 relu(W1 GAP(x)))`` with bias-free linear layers and
  reduction ``r`` (hidden width ``max(1, C // r)``), as DeSAM's release has it (MONAI's ``ChannelSELayer`` uses
  biases, hence this small module).
- :class:`UnetResSEBlock`: MONAI ``UnetResBlock`` (conv3x3 -> norm -> LeakyReLU(0.01) -> conv3x3 -> norm, plus a
  1x1 conv + norm on the residual when the width changes; bias-free convs) with an SE gate applied to the second
  norm's output before the residual sum, then LeakyReLU. Default norm: InstanceNorm without affine parameters.
- :class:`UpResSEBlock`: transposed conv (kernel = stride = ``scale``, bias-free) from ``in`` to ``out`` channels,
  concatenation with a skip of ``out`` channels, then ``UnetResSEBlock(2 out -> out)``.
- :class:`UpsampleResSE`: transposed conv x ``scale`` followed by ``UnetResSEBlock(out -> out)`` (one upsampling stage
  of a context path).

Shapes: N x C x *spatial (``spatial_dims`` = 2 or 3).
"""

from __future__ import annotations

from typing import Sequence

import torch
from monai.networks.blocks.dynunet_block import UnetResBlock, get_conv_layer
from torch import Tensor, nn

LEAKY = ("leakyrelu", {"inplace": True, "negative_slope": 0.01})


class SqueezeExcite(nn.Module):
    """Bias-free SE gate: N x C x ... -> N x C x ... (same shape), reduction ``r``."""

    def __init__(self, channels: int, r: int = 16):
        super().__init__()
        hidden = max(1, channels // r)
        self.fc1 = nn.Linear(channels, hidden, bias=False)
        self.fc2 = nn.Linear(hidden, channels, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        squeezed = x.flatten(2).mean(dim=2)  # N x C
        gate = torch.sigmoid(self.fc2(torch.relu(self.fc1(squeezed))))
        return x * gate.reshape(*gate.shape, *([1] * (x.dim() - 2)))


class UnetResSEBlock(UnetResBlock):
    """MONAI ``UnetResBlock`` with a squeeze-and-excitation gate before the residual sum (stride 1).

    N x in x *spatial -> N x out x *spatial.
    """

    def __init__(self, spatial_dims: int, in_channels: int, out_channels: int, kernel_size: int = 3,
                 norm_name: tuple | str = ("instance", {"affine": False}), act_name: tuple | str = LEAKY,
                 se_reduction: int = 16):
        super().__init__(spatial_dims, in_channels, out_channels, kernel_size=kernel_size, stride=1,
                         norm_name=norm_name, act_name=act_name)
        self.se = SqueezeExcite(out_channels, se_reduction)

    def forward(self, inp: Tensor) -> Tensor:
        out = self.lrelu(self.norm1(self.conv1(inp)))
        out = self.se(self.norm2(self.conv2(out)))
        residual = inp
        if hasattr(self, "conv3"):
            residual = self.norm3(self.conv3(residual))
        return self.lrelu(out + residual)


def _transposed(spatial_dims: int, in_channels: int, out_channels: int, scale: int) -> nn.Module:
    return get_conv_layer(spatial_dims, in_channels, out_channels, kernel_size=scale, stride=scale, act=None,
                          norm=None, bias=False, conv_only=True, is_transposed=True)


class UpsampleResSE(nn.Module):
    """Transposed conv x ``scale`` then a ResSE block: N x in x s -> N x out x (scale s)."""

    def __init__(self, spatial_dims: int, in_channels: int, out_channels: int, scale: int = 2,
                 norm_name: tuple | str = ("instance", {"affine": False}), se_reduction: int = 16):
        super().__init__()
        self.up = _transposed(spatial_dims, in_channels, out_channels, scale)
        self.block = UnetResSEBlock(spatial_dims, out_channels, out_channels, norm_name=norm_name,
                                    se_reduction=se_reduction)

    def forward(self, x: Tensor) -> Tensor:
        return self.block(self.up(x))


class UpResSEBlock(nn.Module):
    """U-Net decoder step: ConvT x ``scale`` (in -> out), concat skip (out channels), ResSE(2 out -> out).

    ``x``: N x in x s, ``skip``: N x out x (scale s) -> N x out x (scale s).
    """

    def __init__(self, spatial_dims: int, in_channels: int, out_channels: int, scale: int = 2,
                 norm_name: tuple | str = ("instance", {"affine": False}), se_reduction: int = 16):
        super().__init__()
        self.up = _transposed(spatial_dims, in_channels, out_channels, scale)
        self.block = UnetResSEBlock(spatial_dims, 2 * out_channels, out_channels, norm_name=norm_name,
                                    se_reduction=se_reduction)

    def forward(self, x: Tensor, skip: Tensor) -> Tensor:
        up = self.up(x)
        if up.shape[2:] != skip.shape[2:]:
            raise ValueError(f"UpResSEBlock: upsampled {tuple(up.shape)} and skip {tuple(skip.shape)} differ in size")
        return self.block(torch.cat([up, skip], dim=1))


def count_parameters(module: nn.Module, trainable_only: bool = True) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)


__all__: Sequence[str] = ("SqueezeExcite", "UnetResSEBlock", "UpsampleResSE", "UpResSEBlock", "count_parameters")
