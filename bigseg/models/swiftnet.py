"""SwiftNet, Oršić, Krešo, Bevandić, Šegvić, "In Defense of Pre-trained ImageNet Architectures for
Real-time Semantic Segmentation of Road-driving Images" (CVPR 2019, arXiv 1903.08469).

A pretrained lightweight encoder, spatial pyramid pooling on its stride-32 features (three levels,
grids of 8, 4 and 2 rows, aspect-aware columns as in LDN), and a ladder of upsampling units that
each add a 1x1 projection of an encoder skip (strides 16, 8, 4) to the bilinearly upsampled coarser
map and blend the sum with one 3x3 convolution, every unit `width` (128) wide; logits at 1/4 are
upsampled bilinearly to the input. All decoder units are BN-ReLU-Conv. Encoders: EfficientNet-Lite
0/1/2 (this library's choice for CPUs) and ResNet-18 (the paper's, skips taken before each stage's
last ReLU as in the authors' code).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from bigseg.models.base import FlatConfig, SegmentationModel
from bigseg.models.blocks import BNReLUConv, Checkpointable, init_weights, pad_to_multiple
from bigseg.models.efficientnet import LITE_VARIANTS, EfficientNetLite
from bigseg.models.ladder import SpatialPyramidPooling
from bigseg.models.resnet import ResNet, ResNetConfig

ENCODERS = ("lite0", "lite1", "lite2", "rn18")


class Upsample(Checkpointable):
    """SwiftNet's upsampling unit: skip -> 1x1 to the path's width, plus the upsampled coarser map,
    blended by a 3x3 convolution."""

    def __init__(self, skip_channels: int, width: int):
        super().__init__()
        self.bottleneck = BNReLUConv(skip_channels, width, 1)
        self.blend = BNReLUConv(width, width, 3)

    def compute(self, coarse: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        skip = self.bottleneck(skip)
        up = F.interpolate(coarse, skip.shape[-2:], mode="bilinear", align_corners=False)
        return self.blend(up + skip)


@dataclass(frozen=True)
class SwiftNetConfig(FlatConfig):
    encoder: str = "lite0"              # lite0, lite1, lite2 (EfficientNet-Lite) or rn18 (ResNet-18)
    width: int = 128                    # the upsampling path and the SPP output ("num_features")
    spp_grids: tuple[int, ...] = (8, 4, 2)  # pooled levels (the authors' code: 3 of 8, 4, 2, 1)


def build_encoder(name: str, in_channels: int) -> nn.Module:
    if name in LITE_VARIANTS and name in ENCODERS:
        return EfficientNetLite(LITE_VARIANTS[name], in_channels)
    if name == "rn18":
        return ResNet(ResNetConfig(18, 32, preactivation_features=True), in_channels)
    raise ValueError(f"encoder must be one of {', '.join(ENCODERS)}, got {name!r}")


class SwiftNet(SegmentationModel):
    """Single-scale SwiftNet: `forward(x)` returns logits of x's size (trained with plain
    cross-entropy: no auxiliary heads, `return_aux` gives None)."""

    def __init__(self, num_classes: int, in_channels: int = 3, config: SwiftNetConfig | None = None):
        config = config or SwiftNetConfig()
        super().__init__(num_classes, in_channels, config)
        if not config.spp_grids or min(config.spp_grids) < 1:
            raise ValueError(f"spp_grids needs one or more positive grid sizes, got {config.spp_grids}")
        self.backbone = build_encoder(config.encoder, in_channels)
        info = self.backbone.feature_info
        w = config.width
        self.output_multiple = self.backbone.output_stride
        self.spp = SpatialPyramidPooling(info[-1]["channels"], w, w // len(config.spp_grids), w, config.spp_grids)
        self.upsample = nn.ModuleList(Upsample(skip["channels"], w) for skip in reversed(info[:-1]))
        self.logits = BNReLUConv(w, num_classes, 1, bias=True)
        init_weights(self)  # the encoder's are replaced when training loads ImageNet weights

    def forward(self, x: torch.Tensor, return_aux: bool = False):
        padded, (h, w) = pad_to_multiple(x, self.output_multiple)
        features = self.backbone(padded)
        y = self.spp(features[-1])
        for unit, skip in zip(self.upsample, reversed(features[:-1])):
            y = unit(y, skip)
        logits = self.resize(self.logits(y), padded.shape[-2:])
        logits = logits[..., :h, :w]
        return (logits, None) if return_aux else logits
