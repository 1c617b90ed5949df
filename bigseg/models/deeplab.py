"""DeepLab v3+ (Chen, Zhu, Papandreou, Schroff, Adam, "Encoder-Decoder with Atrous Separable
Convolution for Semantic Image Segmentation", ECCV 2018, arXiv 1802.02611) on a dilated ResNet.

Encoder: ResNet at output stride 16 (or 8), ASPP = 1x1 conv + three 3x3 atrous convs at rates
6/12/18 (doubled at OS 8) + image-level pooling, each 256 wide with BN-ReLU, concatenated, fused
by 1x1 to 256, dropout 0.1. Decoder: encoder output upsampled 4x (to stride 4), concatenated with
the stride-4 low-level features projected to 48 channels, two 3x3 convs of 256, 1x1 classifier,
4x bilinear upsampling.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from bigseg.models.base import FlatConfig, SegmentationModel
from bigseg.models.blocks import Checkpointable, init_weights, pad_to_multiple
from bigseg.models.resnet import ResNet, ResNetConfig


def conv_bn_relu(in_channels: int, out_channels: int, kernel_size: int = 1, dilation: int = 1) -> nn.Sequential:
    pad = dilation * (kernel_size // 2)
    return nn.Sequential(nn.Conv2d(in_channels, out_channels, kernel_size, padding=pad, dilation=dilation, bias=False),
                         nn.BatchNorm2d(out_channels), nn.ReLU(inplace=True))


class ImagePooling(nn.Module):
    """Global average pooling -> 1x1 conv-BN-ReLU -> broadcast back (ASPP's image-level branch)."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.project = conv_bn_relu(in_channels, out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = self.project(x.mean((2, 3), keepdim=True))
        return pooled.expand(-1, -1, *x.shape[-2:])


class ASPP(Checkpointable):
    def __init__(self, in_channels: int, width: int, rates: tuple[int, ...], dropout: float):
        super().__init__()
        self.branches = nn.ModuleList([conv_bn_relu(in_channels, width, 1)]
                                      + [conv_bn_relu(in_channels, width, 3, r) for r in rates]
                                      + [ImagePooling(in_channels, width)])
        self.project = conv_bn_relu(width * len(self.branches), width, 1)
        self.dropout = nn.Dropout(dropout)

    def compute(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.project(torch.cat([b(x) for b in self.branches], 1)))


@dataclass(frozen=True)
class DeepLabV3PlusConfig(FlatConfig):
    depth: int = 50
    output_stride: int = 16
    rates: tuple[int, ...] = (6, 12, 18)  # at output stride 16; scaled by 16 / output_stride
    aspp_width: int = 256
    low_level_width: int = 48
    decoder_width: int = 256
    decoder_convs: int = 2
    dropout: float = 0.1


class DeepLabV3Plus(SegmentationModel):
    def __init__(self, num_classes: int, in_channels: int = 3, config: DeepLabV3PlusConfig | None = None):
        config = config or DeepLabV3PlusConfig()
        super().__init__(num_classes, in_channels, config)
        self.backbone = ResNet(ResNetConfig(config.depth, config.output_stride), in_channels)
        low, deep = self.backbone.feature_info[0], self.backbone.feature_info[-1]
        rates = tuple(r * 16 // config.output_stride for r in config.rates)
        self.aspp = ASPP(deep["channels"], config.aspp_width, rates, config.dropout)
        self.low_level = conv_bn_relu(low["channels"], config.low_level_width, 1)
        width = config.aspp_width + config.low_level_width
        decoder = []
        for _ in range(config.decoder_convs):
            decoder.append(conv_bn_relu(width, config.decoder_width, 3))
            width = config.decoder_width
        self.decoder = nn.Sequential(*decoder)
        self.classifier = nn.Conv2d(width, num_classes, 1)
        init_weights(self)

    def forward(self, x: torch.Tensor, return_aux: bool = False):
        padded, (h, w) = pad_to_multiple(x, self.output_multiple)
        features = self.backbone(padded)
        low = features[0]
        y = self.resize(self.aspp(features[-1]), low.shape[-2:])
        y = self.classifier(self.decoder(torch.cat([y, self.low_level(low)], 1)))
        logits = self.resize(y, padded.shape[-2:])[..., :h, :w]
        return (logits, None) if return_aux else logits
