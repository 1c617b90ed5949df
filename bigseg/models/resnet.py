"""ResNet backbone (He et al. 2016) with torchvision's parameter names, optionally dilated.

One module serves every ResNet-based decoder: `output_stride` 32 is the plain network; 16 and 8
replace the strides of layer4 (and layer3) by dilation, as DeepLab does, with torchvision's
convention (the first block of a dilated stage keeps the previous dilation). `multi_grid`
multiplies the dilation of the last stage's blocks (DeepLab v3's (1, 2, 4)).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from bigseg.models.blocks import Checkpointable


@dataclass(frozen=True)
class ResNetConfig:
    depth: int = 50
    output_stride: int = 32            # 32, 16 or 8
    multi_grid: tuple[int, ...] = (1,)  # per-block dilation multipliers of layer4 (cycled)


RESNET_LAYERS = {18: (2, 2, 2, 2), 34: (3, 4, 6, 3), 50: (3, 4, 6, 3), 101: (3, 4, 23, 3), 152: (3, 8, 36, 3)}


class BasicBlock(Checkpointable):
    expansion = 1

    def __init__(self, in_channels: int, width: int, stride: int, dilation: int, first_dilation: int):
        super().__init__()
        out = width * self.expansion
        self.conv1 = nn.Conv2d(in_channels, width, 3, stride, first_dilation, first_dilation, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(width, width, 3, 1, dilation, dilation, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.downsample = _shortcut(in_channels, out, stride)

    def compute(self, x: torch.Tensor) -> torch.Tensor:
        y = self.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return self.relu(y + (x if self.downsample is None else self.downsample(x)))


class Bottleneck(Checkpointable):
    """1x1 -> 3x3 (stride and dilation here, as torchvision's v1.5) -> 1x1 x4, plus the shortcut."""

    expansion = 4

    def __init__(self, in_channels: int, width: int, stride: int, dilation: int, first_dilation: int):
        super().__init__()
        out = width * self.expansion
        self.conv1 = nn.Conv2d(in_channels, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride, first_dilation, first_dilation, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, out, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = _shortcut(in_channels, out, stride)

    def compute(self, x: torch.Tensor) -> torch.Tensor:
        y = self.relu(self.bn1(self.conv1(x)))
        y = self.relu(self.bn2(self.conv2(y)))
        y = self.bn3(self.conv3(y))
        return self.relu(y + (x if self.downsample is None else self.downsample(x)))


def _shortcut(in_channels: int, out_channels: int, stride: int) -> nn.Sequential | None:
    if stride == 1 and in_channels == out_channels:
        return None
    return nn.Sequential(nn.Conv2d(in_channels, out_channels, 1, stride, bias=False), nn.BatchNorm2d(out_channels))


class ResNet(nn.Module):
    """ResNet feature extractor: `forward` returns the outputs of layer1..layer4 (strides 4, 8,
    16, 32 before dilation); `feature_info` lists their channels and reductions."""

    def __init__(self, config: ResNetConfig, in_channels: int = 3):
        super().__init__()
        if config.depth not in RESNET_LAYERS:
            raise ValueError(f"ResNet depth {config.depth} unknown; use one of {sorted(RESNET_LAYERS)}")
        if config.output_stride not in (8, 16, 32):
            raise ValueError(f"output_stride must be 8, 16 or 32, got {config.output_stride}")
        self.config = config
        block = Bottleneck if config.depth >= 50 else BasicBlock
        self.conv1 = nn.Conv2d(in_channels, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        dilate = {32: (False, False, False), 16: (False, False, True), 8: (False, True, True)}[config.output_stride]
        channels, dilation, reduction = 64, 1, 4
        self.feature_info: list[dict[str, int]] = []
        for i, (blocks, width) in enumerate(zip(RESNET_LAYERS[config.depth], (64, 128, 256, 512))):
            stride = 1 if i == 0 else 2
            previous = dilation
            if i > 0 and dilate[i - 1]:
                dilation, stride = dilation * stride, 1
            grid = config.multi_grid if i == 3 else (1,)
            layers = []
            for b in range(blocks):
                d = dilation * grid[b % len(grid)]
                first = previous if b == 0 and grid == (1,) else d
                layers.append(block(channels, width, stride if b == 0 else 1, d, first))
                channels = width * block.expansion
            setattr(self, f"layer{i + 1}", nn.Sequential(*layers))
            reduction *= stride
            self.feature_info.append({"channels": channels, "reduction": reduction})

    @property
    def output_stride(self) -> int:
        return self.feature_info[-1]["reduction"]

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))  # stride 4
        out = []
        for i in range(1, 5):
            x = getattr(self, f"layer{i}")(x)
            out.append(x)
        return out

    @staticmethod
    def from_torchvision(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """torchvision's ResNet state dict in this module's names: the same, without `fc`."""
        return {k: v for k, v in state.items() if not k.startswith("fc.")}
