"""Ladder-style DenseNet (LDN), Krešo, Šegvić, Krapac, "Efficient Ladder-style DenseNets for
Semantic Segmentation of Large Images" (arXiv 1905.05661).

DenseNet encoder down to 1/64 (DB3 split by a 2x2 pool), spatial pyramid pooling on its output F,
then a ladder of transition-up blocks that blend skips at 1/32, 1/16, 1/8 and 1/4; logits at 1/4
are upsampled 4x bilinearly. Auxiliary logits at every upsampling level are returned on request.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from bigseg.models.base import SegmentationModel
from bigseg.models.blocks import (
    BNReLUConv,
    Checkpointable,
    init_weights,
    pad_to_multiple,
)
from bigseg.models.densenet import DENSENET_VARIANTS, DenseNet, DenseNetConfig


def spp_grid(rows: int, height: int, width: int) -> tuple[int, int]:
    """Pooling grid of one SPP level: `rows` rows, columns following the aspect ratio (LDN Sec. 3.2)."""
    return rows, max(1, round(width / height * rows))


class SpatialPyramidPooling(Checkpointable):
    """SPP box: project F to D/2, average-pool over grids of 8, 4, 2, 1 rows (aspect-aware columns),
    project each level to D/8, upsample bilinearly, concatenate with the projected F, fuse 1x1."""

    def __init__(self, in_channels: int, bottleneck: int, level_width: int, out_channels: int,
                 grids: tuple[int, ...] = (8, 4, 2, 1)):
        super().__init__()
        self.grids = tuple(grids)
        self.bottleneck = BNReLUConv(in_channels, bottleneck, 1)
        self.levels = nn.ModuleList(BNReLUConv(bottleneck, level_width, 1) for _ in self.grids)
        self.fuse = BNReLUConv(bottleneck + len(self.grids) * level_width, out_channels, 1)

    def compute(self, x: torch.Tensor) -> torch.Tensor:
        x = self.bottleneck(x)
        h, w = x.shape[-2:]
        parts = [x]
        for rows, level in zip(self.grids, self.levels):
            pooled = level(F.adaptive_avg_pool2d(x, spp_grid(rows, h, w)))
            parts.append(F.interpolate(pooled, (h, w), mode="bilinear", align_corners=False))
        return self.fuse(torch.cat(parts, 1))


class TransitionUp(Checkpointable):
    """Ladder upsampling: upsample the coarser map bilinearly, project the skip 1x1 to its width,
    sum, blend with one 3x3 conv (a 1x1 squeeze first where the width must shrink). As in the
    authors' code, the upsampled input is also added back as a residual (projected if widths differ).
    """

    def __init__(self, in_channels: int, skip_channels: int, out_channels: int, squeeze: int):
        super().__init__()
        self.skip_projection = BNReLUConv(skip_channels, in_channels, 1)
        blend: list[nn.Module] = []
        width = in_channels
        if in_channels > squeeze:
            blend.append(BNReLUConv(in_channels, squeeze, 1))
            width = squeeze
        blend.append(BNReLUConv(width, out_channels, 3))
        self.blend = nn.Sequential(*blend)
        self.residual = BNReLUConv(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()

    def compute(self, coarse: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        up = F.interpolate(coarse, skip.shape[-2:], mode="bilinear", align_corners=False)
        return self.blend(self.skip_projection(skip) + up) + self.residual(up)


@dataclass(frozen=True)
class LadderConfig:
    """Everything that shapes a ladder model; widths left at 0 follow from the encoder width D."""

    densenet: DenseNetConfig = field(default_factory=lambda: DENSENET_VARIANTS["121"])
    spp_grids: tuple[int, ...] = (8, 4, 2, 1)
    spp_bottleneck: int = 0   # 0: D/2
    spp_level: int = 0        # 0: D/8
    spp_width: int = 0        # 0: D/4 as in the paper (the authors' code uses 512)
    up_widths: tuple[int, ...] = (256, 256, 128, 128)
    squeeze: int = 128

    @classmethod
    def from_dict(cls, d: dict) -> LadderConfig:
        d = dict(d)
        dn = d.pop("densenet", {})
        dn = DENSENET_VARIANTS[dn] if isinstance(dn, str) else DenseNetConfig(
            **{k: tuple(v) if isinstance(v, list) else v for k, v in dn.items()})
        return cls(densenet=dn, **{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})

    def resolved(self, encoder_width: int) -> LadderConfig:
        return LadderConfig(
            densenet=self.densenet, spp_grids=self.spp_grids,
            spp_bottleneck=self.spp_bottleneck or encoder_width // 2,
            spp_level=self.spp_level or encoder_width // 8,
            spp_width=self.spp_width or encoder_width // 4,
            up_widths=self.up_widths, squeeze=self.squeeze)

    def to_dict(self) -> dict:
        return asdict(self)


class LadderDenseNet(SegmentationModel):
    """LDN: `forward(x)` returns logits of x's size; `forward(x, return_aux=True)` also returns the
    auxiliary logits at 1/64 (SPP output), 1/32, 1/16 and 1/8, coarse to fine."""

    loss_kind = "ladder"

    def __init__(self, num_classes: int, in_channels: int = 3, config: LadderConfig | None = None):
        config = config or LadderConfig()
        super().__init__(num_classes, in_channels, config)
        self.backbone = DenseNet(config.densenet, in_channels)
        info = self.backbone.feature_info
        d = info[-1]["channels"]
        self.config = config.resolved(d)
        c = self.config
        if len(c.up_widths) != len(info) - 1:
            raise ValueError(f"up_widths needs {len(info) - 1} entries, one per skip, got {len(c.up_widths)}")
        self.num_classes = num_classes
        self.in_channels = in_channels
        self.output_multiple = self.backbone.output_stride
        self.spp = SpatialPyramidPooling(d, c.spp_bottleneck, c.spp_level, c.spp_width, c.spp_grids)
        self.upsample = nn.ModuleList()
        width = c.spp_width
        aux_widths = []
        for skip, out in zip(reversed(info[:-1]), c.up_widths):
            aux_widths.append(width)
            self.upsample.append(TransitionUp(width, skip["channels"], out, c.squeeze))
            width = out
        self.logits = BNReLUConv(width, num_classes, 1, bias=True)
        self.aux_logits = nn.ModuleList(BNReLUConv(w, num_classes, 1, bias=True) for w in aux_widths)
        init_weights(self)
        for head in [self.logits, *self.aux_logits]:
            nn.init.xavier_normal_(head.conv.weight)

    def forward(self, x: torch.Tensor, return_aux: bool = False):
        padded, (h, w) = pad_to_multiple(x, self.output_multiple)
        features = self.backbone(padded)
        y = self.spp(features[-1])
        aux = []
        for unit, head, skip in zip(self.upsample, self.aux_logits, reversed(features[:-1])):
            if return_aux:
                aux.append(head(y))
            y = unit(y, skip)
        logits = self.logits(y)
        logits = F.interpolate(logits, padded.shape[-2:], mode="bilinear", align_corners=False)[..., :h, :w]
        return (logits, aux) if return_aux else logits
