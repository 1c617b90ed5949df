"""RefineNet (Lin, Milan, Shen, Reid, "RefineNet: Multi-Path Refinement Networks for
High-Resolution Semantic Segmentation", CVPR 2017, arXiv 1611.06612), 4-cascade on a ResNet.

RefineNet-4 takes ResNet's 1/32 features, RefineNet-3 those at 1/16 plus RefineNet-4's output,
and so on down to 1/4. Each block: every input path is adapted by a 3x3 conv to the block's width
(512 for RefineNet-4, 256 otherwise) and passed through two residual conv units (RCU:
ReLU-conv3x3-ReLU-conv3x3 + identity, no batchnorm); multi-resolution fusion (a 3x3 conv per path
to the smallest width, upsampling to the largest input, sum); chained residual pooling (ReLU, then
`crp_stages` times max-pool 5x5 stride 1 -> conv 3x3, each result summed onto the path); one
output RCU. After RefineNet-1 two more RCUs (Sec. 3.2: three RCUs between blocks, and two before
the softmax), then the 3x3 classifier at 1/4 and 4x bilinear upsampling.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from bigseg.models.base import FlatConfig, SegmentationModel
from bigseg.models.blocks import Checkpointable, init_weights, pad_to_multiple
from bigseg.models.resnet import ResNet, ResNetConfig


def conv3x3(in_channels: int, out_channels: int, bias: bool = False) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=bias)


class RCU(nn.Module):
    """Residual conv unit: ReLU-conv3x3-ReLU-conv3x3 plus identity (no batchnorm)."""

    def __init__(self, width: int):
        super().__init__()
        self.conv1 = conv3x3(width, width, bias=True)
        self.conv2 = conv3x3(width, width, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv2(F.relu(self.conv1(F.relu(x))))


class ChainedResidualPooling(nn.Module):
    def __init__(self, width: int, stages: int):
        super().__init__()
        self.convs = nn.ModuleList(conv3x3(width, width) for _ in range(stages))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(x)
        top = x
        for conv in self.convs:
            top = conv(F.max_pool2d(top, 5, 1, 2))
            x = x + top
        return x


class RefineNetBlock(Checkpointable):
    """One RefineNet: inputs are (channels, width) pairs, the first being the finest path."""

    def __init__(self, inputs: list[tuple[int, int]], width: int, crp_stages: int, output_rcus: int):
        super().__init__()
        self.adapt = nn.ModuleList(conv3x3(c, w) if c != w else nn.Identity() for c, w in inputs)
        self.rcus = nn.ModuleList(nn.Sequential(RCU(w), RCU(w)) for _, w in inputs)
        self.fuse = nn.ModuleList(conv3x3(w, width) for _, w in inputs) if len(inputs) > 1 else None
        self.crp = ChainedResidualPooling(width, crp_stages)
        self.output = nn.Sequential(*(RCU(width) for _ in range(output_rcus)))

    def compute(self, *paths: torch.Tensor) -> torch.Tensor:
        paths = [rcu(adapt(p)) for p, adapt, rcu in zip(paths, self.adapt, self.rcus)]
        if self.fuse is None:
            x = paths[0]
        else:
            size = paths[0].shape[-2:]
            x = self.fuse[0](paths[0])
            for p, conv in zip(paths[1:], self.fuse[1:]):
                x = x + F.interpolate(conv(p), size, mode="bilinear", align_corners=False)
        return self.output(self.crp(x))


@dataclass(frozen=True)
class RefineNetConfig(FlatConfig):
    depth: int = 101
    widths: tuple[int, ...] = (256, 256, 256, 512)  # RefineNet-1..4
    crp_stages: int = 2        # the CVPR paper; the authors' later code uses 4
    dropout: float = 0.0


class RefineNet(SegmentationModel):
    def __init__(self, num_classes: int, in_channels: int = 3, config: RefineNetConfig | None = None):
        config = config or RefineNetConfig()
        super().__init__(num_classes, in_channels, config)
        self.backbone = ResNet(ResNetConfig(config.depth, 32), in_channels)
        info = self.backbone.feature_info
        blocks = []
        previous = None
        for level in (3, 2, 1, 0):
            width = config.widths[level]
            inputs = [(info[level]["channels"], width)]
            if previous is not None:
                inputs.append((previous, previous))
            extra = 1 + (2 if level == 0 else 0)
            blocks.append(RefineNetBlock(inputs, width, config.crp_stages, extra))
            previous = width
        self.refine = nn.ModuleList(blocks)  # RefineNet-4, -3, -2, -1
        self.dropout = nn.Dropout(config.dropout)
        self.classifier = conv3x3(previous, num_classes, bias=True)
        init_weights(self)
        for m in self.modules():  # without batchnorm, start each residual unit as the identity
            if isinstance(m, RCU):
                nn.init.zeros_(m.conv2.weight)

    def forward(self, x: torch.Tensor, return_aux: bool = False):
        padded, (h, w) = pad_to_multiple(x, self.output_multiple)
        features = self.backbone(padded)
        y = None
        for block, f in zip(self.refine, reversed(features)):
            y = block(f) if y is None else block(f, y)
        logits = self.resize(self.classifier(self.dropout(y)), padded.shape[-2:])[..., :h, :w]
        return (logits, None) if return_aux else logits
