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
    preactivation_features: bool = False  # return each stage's sum before its last ReLU (SwiftNet's skips)


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

    def recut(self, stride: int, dilation: int, first_dilation: int) -> None:
        _recut(self.conv1, stride, first_dilation)
        _recut(self.conv2, 1, dilation)
        if self.downsample is not None:
            self.downsample[0].stride = (stride, stride)

    def residual(self, x: torch.Tensor) -> torch.Tensor:
        """The block's sum before its final ReLU."""
        y = self.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return y + (x if self.downsample is None else self.downsample(x))

    def compute(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.residual(x))


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

    def recut(self, stride: int, dilation: int, first_dilation: int) -> None:
        _recut(self.conv2, stride, first_dilation)
        if self.downsample is not None:
            self.downsample[0].stride = (stride, stride)

    def residual(self, x: torch.Tensor) -> torch.Tensor:
        """The block's sum before its final ReLU."""
        y = self.relu(self.bn1(self.conv1(x)))
        y = self.relu(self.bn2(self.conv2(y)))
        y = self.bn3(self.conv3(y))
        return y + (x if self.downsample is None else self.downsample(x))

    def compute(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.residual(x))


def _plan(config: ResNetConfig, stage: int, blocks: int) -> list[tuple[int, int, int]]:
    """(stride, dilation, first dilation) of each block of `stage` (0..3) for the output stride:
    torchvision's convention, the first block of a dilated stage keeps the previous dilation;
    `multi_grid` multiplies the last stage's dilations."""
    dilate = {32: (False, False, False), 16: (False, False, True), 8: (False, True, True)}[config.output_stride]
    dilation = 1
    for i in range(stage + 1):
        previous = dilation
        stride = 1 if i == 0 else 2
        if i > 0 and dilate[i - 1]:
            dilation, stride = dilation * stride, 1
    grid = config.multi_grid if stage == 3 else (1,)
    plan = []
    for b in range(blocks):
        d = dilation * grid[b % len(grid)]
        plan.append((stride if b == 0 else 1, d, previous if b == 0 and grid == (1,) else d))
    return plan


def _recut(conv: nn.Conv2d, stride: int, dilation: int) -> None:
    conv.stride, conv.dilation, conv.padding = (stride, stride), (dilation, dilation), (dilation, dilation)


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
        channels = 64
        self.feature_info: list[dict[str, int]] = []
        for i, (blocks, width) in enumerate(zip(RESNET_LAYERS[config.depth], (64, 128, 256, 512))):
            layers = []
            for stride, d, first in _plan(config, i, blocks):
                layers.append(block(channels, width, stride, d, first))
                channels = width * block.expansion
            setattr(self, f"layer{i + 1}", nn.Sequential(*layers))
            self.feature_info.append({"channels": channels, "reduction": 0})
        self._set_reductions()

    def _set_reductions(self) -> None:
        reduction = 4
        for i, info in enumerate(self.feature_info):
            reduction *= _plan(self.config, i, 1)[0][0]
            info["reduction"] = reduction

    def set_output_stride(self, output_stride: int) -> None:
        """Re-cut the network for another output stride in place (strides become dilations or
        back; no parameter changes): DeepLab v3 trains at 16 and evaluates at 8."""
        self.config = ResNetConfig(self.config.depth, output_stride, self.config.multi_grid,
                                   self.config.preactivation_features)
        for i in range(4):
            layer = getattr(self, f"layer{i + 1}")
            for unit, (stride, d, first) in zip(layer, _plan(self.config, i, len(layer))):
                unit.recut(stride, d, first)
        self._set_reductions()

    @property
    def output_stride(self) -> int:
        return self.feature_info[-1]["reduction"]

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))  # stride 4
        out = []
        for i in range(1, 5):
            layer = getattr(self, f"layer{i}")
            if self.config.preactivation_features:
                pre = layer[-1].residual(layer[:-1](x))
                out.append(pre)
                x = torch.relu(pre)  # not in place: `pre` is kept as the skip
            else:
                x = layer(x)
                out.append(x)
        return out

    @staticmethod
    def from_pretrained(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """torchvision's ResNet state dict in this module's names: the same, without `fc`."""
        return {k: v for k, v in state.items() if not k.startswith("fc.")}
