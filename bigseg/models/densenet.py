"""DenseNet-BC backbone (Huang et al. 2017) with torchvision's parameter names.

Returns feature maps at known strides; optionally splits one dense block in half with a strided
2x2 average pooling, as the Ladder DenseNet does with DB3 (Krešo et al. 2019, Sec. 3).
"""
from __future__ import annotations

import re
from collections import OrderedDict
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from bigseg.models.blocks import Checkpointable


@dataclass(frozen=True)
class DenseNetConfig:
    growth_rate: int = 32
    block_config: tuple[int, ...] = (6, 12, 24, 16)
    num_init_features: int = 64
    bn_size: int = 4
    split_block: int | None = 2  # zero-based block split in half by a 2x2 average pooling (DB3)


DENSENET_VARIANTS = {
    "121": DenseNetConfig(32, (6, 12, 24, 16), 64),
    "169": DenseNetConfig(32, (6, 12, 32, 32), 64),
    "161": DenseNetConfig(48, (6, 12, 36, 24), 96),
}


class Features(Checkpointable, nn.ModuleDict):
    """torchvision's `features` container. Calling it runs the stem only:
    conv 7x7/2 -> BN -> ReLU -> max-pool 2x2/2 (the ladder model's 2x2 pool, not torchvision's 3x3).
    """

    def compute(self, x: torch.Tensor) -> torch.Tensor:
        return self["pool0"](self["relu0"](self["norm0"](self["conv0"](x))))


class DenseLayer(Checkpointable):
    """BN-ReLU-conv1x1 (bottleneck to bn_size*k) then BN-ReLU-conv3x3 (k new maps).

    The concatenation of all earlier maps happens inside `compute`, so with checkpointing only the
    3x3 outputs are stored: the memory-hungry concatenations and batchnorms are recomputed.
    """

    def __init__(self, in_channels: int, growth_rate: int, bn_size: int):
        super().__init__()
        self.norm1 = nn.BatchNorm2d(in_channels)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(in_channels, bn_size * growth_rate, 1, bias=False)
        self.norm2 = nn.BatchNorm2d(bn_size * growth_rate)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(bn_size * growth_rate, growth_rate, 3, padding=1, bias=False)

    def compute(self, *features: torch.Tensor) -> torch.Tensor:
        x = torch.cat(features, 1)
        x = self.conv1(self.relu1(self.norm1(x)))
        return self.conv2(self.relu2(self.norm2(x)))


class DenseBlock(nn.ModuleDict):
    """`num_layers` dense layers; with `split_at`, the maps so far are returned as a skip and
    average-pooled 2x2/2 before the remaining layers run at half resolution."""

    def __init__(self, num_layers: int, in_channels: int, growth_rate: int, bn_size: int,
                 split_at: int | None = None):
        super().__init__()
        for i in range(num_layers):
            self[f"denselayer{i + 1}"] = DenseLayer(in_channels + i * growth_rate, growth_rate, bn_size)
        self.split_at = split_at

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor]:
        features = [x]
        skip = None
        for i, layer in enumerate(self.values()):
            if i == self.split_at:
                skip = torch.cat(features, 1)
                features = [F.avg_pool2d(skip, 2, 2)]
            features.append(layer(*features))
        return skip, torch.cat(features, 1)


class Transition(Checkpointable, nn.Sequential):
    """BN-ReLU-conv1x1 halving the channels, then 2x2/2 average pooling."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__(OrderedDict(
            norm=nn.BatchNorm2d(in_channels),
            relu=nn.ReLU(inplace=True),
            conv=nn.Conv2d(in_channels, out_channels, 1, bias=False),
            pool=nn.AvgPool2d(2, 2),
        ))

    def compute(self, x: torch.Tensor) -> torch.Tensor:
        for module in self:
            x = module(x)
        return x


class DenseNet(nn.Module):
    """DenseNet-BC feature extractor. `forward` returns maps at `feature_info` strides.

    With the ladder split (DenseNet-121): 256@4, 512@8, 640@16 (DB3a), 1024@32 (DB3), 1024@64 (DB4).
    Skips are taken before each transition, as in the LDN reference.
    """

    def __init__(self, config: DenseNetConfig, in_channels: int = 3):
        super().__init__()
        c = config
        self.config = config
        self.features = Features(OrderedDict(
            conv0=nn.Conv2d(in_channels, c.num_init_features, 7, stride=2, padding=3, bias=False),
            norm0=nn.BatchNorm2d(c.num_init_features),
            relu0=nn.ReLU(inplace=True),
            pool0=nn.MaxPool2d(2, 2),
        ))
        channels, reduction = c.num_init_features, 4
        self.feature_info: list[dict[str, int]] = []
        for i, num_layers in enumerate(c.block_config):
            split_at = num_layers // 2 if c.split_block == i else None
            self.features[f"denseblock{i + 1}"] = DenseBlock(
                num_layers, channels, c.growth_rate, c.bn_size, split_at)
            if split_at is not None:
                self.feature_info.append(
                    {"channels": channels + split_at * c.growth_rate, "reduction": reduction})
                reduction *= 2
            channels += num_layers * c.growth_rate
            self.feature_info.append({"channels": channels, "reduction": reduction})
            if i + 1 < len(c.block_config):
                self.features[f"transition{i + 1}"] = Transition(channels, channels // 2)
                channels //= 2
                reduction *= 2
        self.num_features = channels

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        out = []
        x = self.features(x)
        for i in range(len(self.config.block_config)):
            skip, x = self.features[f"denseblock{i + 1}"](x)
            if skip is not None:
                out.append(skip)
            out.append(x)
            transition = self.features[f"transition{i + 1}"] if i + 1 < len(self.config.block_config) else None
            if transition is not None:
                x = transition(x)
        return out

    @property
    def output_stride(self) -> int:
        return self.feature_info[-1]["reduction"]

    @staticmethod
    def from_pretrained(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return torchvision_to_backbone_keys(state)[0]


# torchvision's very first DenseNet checkpoints spelled 'norm.1' for 'norm1' (torchvision's own fix-up).
_OLD_KEY = re.compile(r"^(.*denselayer\d+\.(?:norm|relu|conv))\.((?:[12])\.(?:weight|bias|running_mean|running_var))$")
_TORCHVISION_ONLY = ("features.norm5.", "classifier.")


def torchvision_to_backbone_keys(state_dict: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Map a torchvision `densenet*` state dict onto `DenseNet` names.

    Returns the mapped dict and the keys deliberately dropped (norm5 and the classifier, which the
    ladder model does not use).
    """
    mapped, dropped = {}, []
    for key, value in state_dict.items():
        m = _OLD_KEY.match(key)
        if m:
            key = m.group(1) + m.group(2)
        if key.startswith(_TORCHVISION_ONLY):
            dropped.append(key)
            continue
        mapped[key] = value
    return mapped, dropped
