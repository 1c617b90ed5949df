"""The modified, aligned Xception-65 of DeepLab v3+ (Chen et al., ECCV 2018, Sec. 3.2 and Fig. 4),
after the TF reference (`research/deeplab/core/xception.py`, `xception_65`):

- entry flow: 3x3/2 conv 32, 3x3 conv 64, then three blocks of three separable convolutions
  (128, 256, 728), each block's last one strided (strided separable convolutions replace the
  max-pools), with a 1x1 strided shortcut;
- middle flow: 16 blocks of three 728-wide separable convolutions with identity shortcuts;
- exit flow: a block of (728, 1024, 1024), strided, with a 1x1 shortcut; then separable
  convolutions of 1536, 1536 and 2048;
- every separable convolution is depthwise 3x3 -> BN -> ReLU -> pointwise 1x1 -> BN -> ReLU
  ("extra batch normalization and ReLU activation are added after each 3x3 depthwise
  convolution"); for an output stride of 16 (or 8) the strides from there on become dilation.

`feature_info` lists the low-level features the decoder uses (entry flow block 2 before its
strided convolution: 256 channels at stride 4) and the exit flow's 2048 channels.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from bigseg.models.blocks import Checkpointable


@dataclass(frozen=True)
class XceptionConfig:
    output_stride: int = 16  # 32, 16 or 8
    middle_blocks: int = 16  # Xception-65; 8 in the original 41-layer network


class SeparableConv(nn.Sequential):
    """Depthwise 3x3 (dilated) -> BN -> ReLU -> pointwise 1x1 -> BN -> ReLU; also DeepLab v3+'s
    atrous separable convolution in ASPP and decoder."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1, dilation: int = 1):
        super().__init__()
        self.depthwise = nn.Conv2d(in_channels, in_channels, 3, stride, dilation, dilation, groups=in_channels,
                                   bias=False)
        self.depthwise_bn = nn.BatchNorm2d(in_channels)
        self.depthwise_relu = nn.ReLU(inplace=True)
        self.pointwise = nn.Conv2d(in_channels, out_channels, 1, bias=False)
        self.pointwise_bn = nn.BatchNorm2d(out_channels)
        self.pointwise_relu = nn.ReLU(inplace=True)


class XceptionBlock(Checkpointable):
    """Three separable convolutions (the last one with the stride) and a shortcut: "conv" (1x1
    strided conv + BN), "sum" (identity) or "none". `tap`: also return the output of the second
    convolution (DeepLab v3+'s low-level feature)."""

    def __init__(self, in_channels: int, widths: tuple[int, int, int], shortcut: str, stride: int = 1,
                 dilation: int = 1, tap: bool = False):
        super().__init__()
        self.units = nn.ModuleList()
        channels = in_channels
        for i, width in enumerate(widths):
            self.units.append(SeparableConv(channels, width, stride if i == 2 else 1, dilation))
            channels = width
        self.shortcut_kind, self.tap = shortcut, tap
        self.shortcut = (nn.Sequential(nn.Conv2d(in_channels, channels, 1, stride, bias=False), nn.BatchNorm2d(channels))
                         if shortcut == "conv" else None)

    def compute(self, x: torch.Tensor):
        y = self.units[1](self.units[0](x))
        low = y
        y = self.units[2](y)
        if self.shortcut_kind == "conv":
            y = y + self.shortcut(x)
        elif self.shortcut_kind == "sum":
            y = y + x
        return (y, low) if self.tap else y


class Xception(nn.Module):
    """Xception-65 feature extractor (see the module docstring): `forward` returns [low-level
    features at stride 4, exit-flow features at the output stride]."""

    def __init__(self, config: XceptionConfig | None = None, in_channels: int = 3):
        super().__init__()
        c = self.config = config or XceptionConfig()
        if c.output_stride not in (8, 16, 32):
            raise ValueError(f"output_stride must be 8, 16 or 32, got {c.output_stride}")
        self.stem = nn.Sequential(nn.Conv2d(in_channels, 32, 3, 2, 1, bias=False), nn.BatchNorm2d(32), nn.ReLU(inplace=True),
                                  nn.Conv2d(32, 64, 3, 1, 1, bias=False), nn.BatchNorm2d(64), nn.ReLU(inplace=True))
        reduction, dilation = 2, 1

        def step(stride: int) -> tuple[int, int]:
            """The stride a block may still apply and its dilation, given the output stride."""
            nonlocal reduction, dilation
            if reduction * stride > c.output_stride:
                dilation *= stride
                return 1, dilation
            reduction *= stride
            return stride, dilation

        self.entry1 = XceptionBlock(64, (128, 128, 128), "conv", *step(2))
        self.entry2 = XceptionBlock(128, (256, 256, 256), "conv", *step(2), tap=True)
        self.entry3 = XceptionBlock(256, (728, 728, 728), "conv", *step(2))
        _, d = step(1)
        self.middle = nn.Sequential(*[XceptionBlock(728, (728, 728, 728), "sum", 1, d) for _ in range(c.middle_blocks)])
        self.exit1 = XceptionBlock(728, (728, 1024, 1024), "conv", *step(2))
        _, d = step(1)
        self.exit2 = nn.Sequential(SeparableConv(1024, 1536, 1, d), SeparableConv(1536, 1536, 1, d),
                                   SeparableConv(1536, 2048, 1, d))
        self.feature_info = [{"channels": 256, "reduction": 4}, {"channels": 2048, "reduction": reduction}]

    @property
    def output_stride(self) -> int:
        return self.feature_info[-1]["reduction"]

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = self.entry1(self.stem(x))
        x, low = self.entry2(x)
        x = self.middle(self.entry3(x))
        return [low, self.exit2(self.exit1(x))]
