"""The DeepLab family, each system as its paper describes it, on shared backbones and blocks:

- v1, DeepLab-LargeFOV (Chen et al., ICLR 2015, arXiv 1412.7062): VGG-16 at output stride 8 with
  fc6 a 3x3 convolution at dilation 12 (1024 wide) and fc7 1x1 (1024), fc8 1x1 to the classes,
  bilinear upsampling (`bigseg.models.vgg`); the dense CRF follows in predict (`--crf`).
- v2 (Chen et al., TPAMI 2017, arXiv 1606.00915): ResNet-101 at output stride 8 and ASPP-L, four
  parallel 3x3 atrous convolutions at rates 6, 12, 18, 24, each straight to the classes, summed;
  in training, multi-scale inputs (1, 0.75, 0.5) whose logits are fused by a pixel-wise max, with
  a loss on every scale and on the fusion (MSC).
- v3 (Chen et al., arXiv 1706.05587): ASPP with batch norm and image-level pooling (1x1 and three
  3x3 at rates 6/12/18, 256 wide, doubled at output stride 8), multi-grid (1, 2, 4) in the last
  ResNet block, no decoder; output stride 16 in training, 8 in evaluation.
- v3+ (Chen et al., ECCV 2018, arXiv 1802.02611): v3's encoder with a decoder (the stride-4
  low-level features projected to 48 channels, concatenated with the upsampled encoder output,
  two 3x3 convolutions of 256, 1x1 classifier, 4x bilinear upsampling), on a dilated ResNet or
  the modified Xception-65 (`bigseg.models.xception`), with atrous separable convolutions in
  ASPP and decoder when `separable`.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from bigseg.models.base import FlatConfig, SegmentationModel
from bigseg.models.blocks import Checkpointable, init_weights, pad_to_multiple
from bigseg.models.resnet import ResNet, ResNetConfig
from bigseg.models.vgg import VGG16, VGGConfig
from bigseg.models.xception import SeparableConv, Xception, XceptionConfig


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
    """Atrous spatial pyramid pooling of v3/v3+: a 1x1 branch, one 3x3 atrous branch per rate
    (atrous separable with `separable`) and image pooling, each BN-ReLU, concatenated, fused 1x1."""

    def __init__(self, in_channels: int, width: int, rates: tuple[int, ...], dropout: float, separable: bool = False):
        super().__init__()
        atrous = (lambda r: SeparableConv(in_channels, width, 1, r)) if separable else \
            (lambda r: conv_bn_relu(in_channels, width, 3, r))
        self.branches = nn.ModuleList([conv_bn_relu(in_channels, width, 1)] + [atrous(r) for r in rates]
                                      + [ImagePooling(in_channels, width)])
        self.project = conv_bn_relu(width * len(self.branches), width, 1)
        self.dropout = nn.Dropout(dropout)

    def set_rates(self, rates: tuple[int, ...]) -> None:
        """Other dilation rates for the same weights (v3 evaluates at output stride 8)."""
        for branch, r in zip(self.branches[1:-1], rates):
            conv = branch.depthwise if isinstance(branch, SeparableConv) else branch[0]
            conv.dilation, conv.padding = (r, r), (r, r)

    def compute(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.project(torch.cat([b(x) for b in self.branches], 1)))


class ASPPL(nn.Module):
    """DeepLab v2's ASPP-L: parallel 3x3 atrous convolutions straight to the classes, summed."""

    def __init__(self, in_channels: int, num_classes: int, rates: tuple[int, ...]):
        super().__init__()
        self.branches = nn.ModuleList(nn.Conv2d(in_channels, num_classes, 3, padding=r, dilation=r) for r in rates)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return sum(b(x) for b in self.branches)


@dataclass(frozen=True)
class DeepLabV1Config(FlatConfig):
    fc_width: int = 1024
    fc6_dilation: int = 12
    dropout: float = 0.5


class DeepLabV1(SegmentationModel):
    """DeepLab-LargeFOV: VGG-16 (output stride 8, fc6 3x3 at dilation 12), fc8 1x1, 8x bilinear."""

    output_multiple = 8
    context_margin = 182  # 99% of the centre's input gradient, at 512 and 1024 px alike (benchmarks/receptive_field.py)

    def __init__(self, num_classes: int, in_channels: int = 3, config: DeepLabV1Config | None = None):
        config = config or DeepLabV1Config()
        super().__init__(num_classes, in_channels, config)
        self.backbone = VGG16(VGGConfig(config.fc_width, config.fc6_dilation, 3, config.dropout), in_channels)
        self.classifier = nn.Conv2d(config.fc_width, num_classes, 1)
        init_weights(self)
        nn.init.normal_(self.classifier.weight, std=0.01)  # fc8 as in the paper

    def forward(self, x: torch.Tensor, return_aux: bool = False):
        padded, (h, w) = pad_to_multiple(x, self.output_multiple)
        logits = self.resize(self.classifier(self.backbone(padded)[-1]), padded.shape[-2:])[..., :h, :w]
        return (logits, None) if return_aux else logits


@dataclass(frozen=True)
class DeepLabV2Config(FlatConfig):
    depth: int = 101
    output_stride: int = 8
    rates: tuple[int, ...] = (6, 12, 18, 24)     # ASPP-L
    train_scales: tuple[float, ...] = (1.0, 0.75, 0.5)  # MSC in training, max fusion; () for one scale


class DeepLabV2(SegmentationModel):
    """ResNet + ASPP-L; multi-scale inputs with max fusion in training (the loss is on every scale
    and on the fusion, `loss_kind` "msc"); at inference one scale (predict's `--scales` averages)."""

    loss_kind = "msc"

    def __init__(self, num_classes: int, in_channels: int = 3, config: DeepLabV2Config | None = None):
        config = config or DeepLabV2Config()
        super().__init__(num_classes, in_channels, config)
        self.backbone = ResNet(ResNetConfig(config.depth, config.output_stride), in_channels)
        self.aspp = ASPPL(self.backbone.feature_info[-1]["channels"], num_classes, tuple(config.rates))
        init_weights(self)
        for branch in self.aspp.branches:
            nn.init.normal_(branch.weight, std=0.01)
            nn.init.zeros_(branch.bias)

    def _logits(self, x: torch.Tensor) -> torch.Tensor:
        padded, (h, w) = pad_to_multiple(x, self.output_multiple)
        return self.resize(self.aspp(self.backbone(padded)[-1]), padded.shape[-2:])[..., :h, :w]

    def forward(self, x: torch.Tensor, return_aux: bool = False):
        if not (return_aux and self.config.train_scales):
            logits = self._logits(x)
            return (logits, []) if return_aux else logits
        h, w = x.shape[-2:]
        per_scale = []
        for s in self.config.train_scales:
            xs = x if s == 1 else self.resize(x, (max(8, round(h * s)), max(8, round(w * s))))
            per_scale.append(self.resize(self._logits(xs), (h, w)))
        return torch.stack(per_scale).amax(0), per_scale


@dataclass(frozen=True)
class DeepLabV3Config(FlatConfig):
    depth: int = 101
    output_stride: int = 16        # in training
    eval_output_stride: int = 8    # in evaluation (same weights, rates doubled)
    multi_grid: tuple[int, ...] = (1, 2, 4)
    rates: tuple[int, ...] = (6, 12, 18)  # at output stride 16
    aspp_width: int = 256
    dropout: float = 0.1


class DeepLabV3(SegmentationModel):
    """ResNet with multi-grid + ASPP (image pooling, BN) + 1x1 classifier, bilinear upsampling;
    the network is re-cut to `eval_output_stride` in eval mode and back in training."""

    def __init__(self, num_classes: int, in_channels: int = 3, config: DeepLabV3Config | None = None):
        config = config or DeepLabV3Config()
        super().__init__(num_classes, in_channels, config)
        self.backbone = ResNet(ResNetConfig(config.depth, config.output_stride, tuple(config.multi_grid)), in_channels)
        self.aspp = ASPP(self.backbone.feature_info[-1]["channels"], config.aspp_width,
                         self._rates(config.output_stride), config.dropout)
        self.classifier = nn.Conv2d(config.aspp_width, num_classes, 1)
        init_weights(self)

    def _rates(self, output_stride: int) -> tuple[int, ...]:
        return tuple(r * 16 // output_stride for r in self.config.rates)  # rates are given at stride 16

    def train(self, mode: bool = True):
        super().train(mode)
        stride = self.config.output_stride if mode else self.config.eval_output_stride
        if self.backbone.output_stride != stride:
            self.backbone.set_output_stride(stride)
            self.aspp.set_rates(self._rates(stride))
        return self

    def forward(self, x: torch.Tensor, return_aux: bool = False):
        padded, (h, w) = pad_to_multiple(x, self.output_multiple)
        y = self.classifier(self.aspp(self.backbone(padded)[-1]))
        logits = self.resize(y, padded.shape[-2:])[..., :h, :w]
        return (logits, None) if return_aux else logits


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
    backbone: str = "resnet"   # resnet (depth) or xception65
    separable: bool = False    # atrous separable convolutions in ASPP and decoder
    middle_blocks: int = 16    # Xception's middle flow (65 layers with 16)


class DeepLabV3Plus(SegmentationModel):
    def __init__(self, num_classes: int, in_channels: int = 3, config: DeepLabV3PlusConfig | None = None):
        config = config or DeepLabV3PlusConfig()
        super().__init__(num_classes, in_channels, config)
        if config.backbone == "xception65":
            self.backbone = Xception(XceptionConfig(config.output_stride, config.middle_blocks), in_channels)
        elif config.backbone == "resnet":
            self.backbone = ResNet(ResNetConfig(config.depth, config.output_stride), in_channels)
        else:
            raise ValueError(f"backbone must be resnet or xception65, got {config.backbone!r}")
        low, deep = self.backbone.feature_info[0], self.backbone.feature_info[-1]
        rates = tuple(r * 16 // config.output_stride for r in config.rates)
        self.aspp = ASPP(deep["channels"], config.aspp_width, rates, config.dropout, config.separable)
        self.low_level = conv_bn_relu(low["channels"], config.low_level_width, 1)
        width = config.aspp_width + config.low_level_width
        decoder = []
        for _ in range(config.decoder_convs):
            decoder.append(SeparableConv(width, config.decoder_width) if config.separable
                           else conv_bn_relu(width, config.decoder_width, 3))
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
