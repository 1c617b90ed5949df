"""Dynamic Routing (Li, Song, Zhang, Zhang, Sun, Wang, Yuan, "Learning Dynamic Routing for
Semantic Segmentation", CVPR 2020, arXiv 2003.10401), trained from scratch.

A fixed stem (3x3/2 conv, separable 3x3, separable 3x3/2) brings the image to 1/4. The routing
space has `layers` layers; layer l holds cells at scales 1/4 .. 1/32 (2, 3, then 4 of them, as
in the paper's CELL_NUM_LIST). A cell sums what reaches it, applies two separable 3x3 convs plus
the identity, and a soft conditional gate (1x1 conv C->C/2-BN-ReLU, global average pool, 1x1
conv to one logit per outgoing route, bias 1.5, activation max(0, tanh)) weighs its three routes
to the next layer: up (ReLU-1x1 to C/2-BN-ReLU, 2x bilinear), keep (identity) and down (ReLU-1x1
stride 2 to 2C-BN-ReLU). The last layer's cells feed the decoder (per-scale 1x1 conv-BN-ReLU
halving channels, coarse to fine with 2x upsampling and sums; 3x3 classifier at 1/4; 4x
upsampling).

At inference a route whose gate is 0 for the whole batch is not computed, and a cell that
nothing reaches is skipped. Training adds the budget constraint lambda (C_exp / C_all - mu)^2,
C_exp the gate-weighted multiply-adds of cells and routes, switched on after 40% of the steps
with a 2% ramp (`bigseg.train.losses.budget_loss`).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from bigseg.models.base import FlatConfig, SegmentationModel
from bigseg.models.blocks import Checkpointable, init_weights, pad_to_multiple

ROUTES = ("up", "keep", "down")


class SepConv(nn.Sequential):
    """ReLU -> depthwise 3x3 -> pointwise 1x1 -> BN."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1, relu_first: bool = True):
        super().__init__(*([nn.ReLU()] if relu_first else []),
                         nn.Conv2d(in_channels, in_channels, 3, stride, 1, groups=in_channels, bias=False),
                         nn.Conv2d(in_channels, out_channels, 1, bias=False), nn.BatchNorm2d(out_channels))


class CellOp(Checkpointable):
    """Two separable 3x3 convs plus identity (the 'sep_conv_3x3' + 'skip_connect' cell)."""

    def __init__(self, channels: int):
        super().__init__()
        self.ops = nn.Sequential(SepConv(channels, channels), SepConv(channels, channels))

    def compute(self, x: torch.Tensor) -> torch.Tensor:
        return self.ops(x) + x


class Gate(nn.Module):
    def __init__(self, channels: int, routes: int, bias: float, small: bool):
        super().__init__()
        self.small = small
        self.reduce = nn.Sequential(nn.Conv2d(channels, channels // 2, 1, bias=False),
                                    nn.BatchNorm2d(channels // 2), nn.ReLU(inplace=True))
        self.logits = nn.Conv2d(channels // 2, routes, 1)
        self.bias_init = bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.small:
            x = F.interpolate(x, scale_factor=0.25, mode="bilinear", align_corners=False)
        g = self.logits(self.reduce(x).mean((2, 3), keepdim=True)).flatten(1)
        return torch.tanh(g).clamp_min(0)  # max(0, tanh): exactly 0 closes a route


class Cell(nn.Module):
    def __init__(self, channels: int, routes: tuple[str, ...], gate_bias: float, small_gate: bool):
        super().__init__()
        self.channels, self.routes = channels, routes
        self.op = CellOp(channels)
        self.gate = Gate(channels, len(routes), gate_bias, small_gate) if routes else None
        self.up = nn.Sequential(nn.ReLU(), nn.Conv2d(channels, channels // 2, 1, bias=False),
                                nn.BatchNorm2d(channels // 2), nn.ReLU(inplace=True)) if "up" in routes else None
        self.down = nn.Sequential(nn.ReLU(), nn.Conv2d(channels, channels * 2, 1, 2, bias=False),
                                  nn.BatchNorm2d(channels * 2), nn.ReLU(inplace=True)) if "down" in routes else None

    def macs_per_pixel(self, gate_scale: float) -> dict[str, float]:
        """Multiply-adds per pixel of this cell's scale: the op (+ gate), and each route."""
        c = self.channels
        out = {"op": 2 * (9 * c + c * c) + (c * c / 2 * gate_scale if self.gate is not None else 0.0)}
        if self.up is not None:
            out["up"] = c * c / 2
        if self.down is not None:
            out["down"] = c * 2 * c / 4  # computed at the next scale: a quarter of the pixels
        out["keep"] = 0.0
        return out


@dataclass(frozen=True)
class DynamicRoutingConfig(FlatConfig):
    layers: int = 16
    width: int = 64             # C: channels at 1/4, doubling per scale
    scales: int = 4             # 1/4 .. 1/32
    gate_bias: float = 1.5
    small_gate: bool = False    # gate on a 4x downsampled input (Dynamic-A)
    budget_lambda: float = 0.0  # 0: Dynamic-Raw; A: 0.8/0.1 (small gate), B: 0.5/0.1, C: 0.5/0.2
    budget_mu: float = 0.1
    budget_start: float = 0.4   # fraction of the steps before the budget loss starts
    budget_warmup: float = 0.02  # fraction of the steps over which it ramps up


class DynamicRouting(SegmentationModel):
    loss_kind = "budget"

    def __init__(self, num_classes: int, in_channels: int = 3, config: DynamicRoutingConfig | None = None):
        config = config or DynamicRoutingConfig()
        super().__init__(num_classes, in_channels, config)
        c = config.width
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, c, 3, 2, 1, bias=False), nn.BatchNorm2d(c), nn.ReLU(inplace=True),
            SepConv(c, c, relu_first=False), nn.ReLU(inplace=True),
            SepConv(c, c, 2, relu_first=False), nn.ReLU(inplace=True))
        self.stem_down = nn.Sequential(nn.Conv2d(c, 2 * c, 1, 2, bias=False), nn.BatchNorm2d(2 * c), nn.ReLU(inplace=True))
        self.cells_per_layer = [min(config.scales, layer + 2) for layer in range(config.layers)]
        self.cells = nn.ModuleList()
        for layer, n in enumerate(self.cells_per_layer):
            row = nn.ModuleList()
            nxt = self.cells_per_layer[layer + 1] if layer + 1 < config.layers else 0
            for i in range(n):
                routes = tuple(r for r, target in zip(ROUTES, (i - 1, i, i + 1)) if 0 <= target < nxt)
                row.append(Cell(c * 2 ** i, routes, config.gate_bias, config.small_gate))
            self.cells.append(row)
        self.decode = nn.ModuleList(
            nn.Sequential(nn.Conv2d(c * 2 ** i, c * 2 ** max(i - 1, 0), 1, bias=False),
                          nn.BatchNorm2d(c * 2 ** max(i - 1, 0)), nn.ReLU(inplace=True))
            for i in range(config.scales))
        self.classifier = nn.Conv2d(c, num_classes, 3, padding=1)
        init_weights(self)
        for row in self.cells:
            for cell in row:
                if cell.gate is not None:
                    nn.init.constant_(cell.gate.logits.bias, config.gate_bias)

    def forward(self, x: torch.Tensor, return_aux: bool = False):
        padded, (h, w) = pad_to_multiple(x, self.output_multiple)
        stem = self.stem(padded)
        b = stem.shape[0]
        sizes = [(stem.shape[-2] // 2 ** i, stem.shape[-1] // 2 ** i) for i in range(self.config.scales)]
        # incoming[i]: list of (tensor, weight (B,) or None) reaching scale i of the current layer
        incoming: list[list] = [[] for _ in sizes]
        incoming[0].append((stem, None))
        incoming[1].append((self.stem_down(stem), None))
        skip = not self.training and not stem.is_meta
        expected = stem.new_zeros(b, dtype=torch.float32)
        total = 0.0
        outputs: list[torch.Tensor | None] = []
        for layer, row in enumerate(self.cells):
            nxt: list[list] = [[] for _ in sizes]
            outputs = []
            for i, cell in enumerate(row):
                pixels = sizes[i][0] * sizes[i][1]
                cost = cell.macs_per_pixel(1 / 16 if self.config.small_gate else 1.0)
                total += sum(cost.values()) * pixels
                if not incoming[i]:
                    outputs.append(None)
                    continue
                x_in = sum(t if wgt is None else t * wgt.view(b, 1, 1, 1) for t, wgt in incoming[i])
                active = sum(torch.ones_like(expected) if wgt is None else wgt for _, wgt in incoming[i])
                expected = expected + active.clamp(max=1.0) * cost["op"] * pixels
                y = cell.op(x_in)
                outputs.append(y)
                if cell.gate is None:
                    continue
                gates = cell.gate(y)
                for k, route in enumerate(cell.routes):
                    g = gates[:, k]
                    expected = expected + g.float() * cost[route] * pixels
                    if skip and not bool((g > 0).any()):
                        continue  # closed for every image in the batch: not computed
                    if route == "keep":
                        nxt[i].append((y, g))
                    elif route == "up":
                        nxt[i - 1].append((F.interpolate(cell.up(y), sizes[i - 1], mode="bilinear",
                                                         align_corners=False), g))
                    else:
                        nxt[i + 1].append((cell.down(y), g))
            incoming = nxt
        y = None
        for i in reversed(range(self.config.scales)):
            f = outputs[i] if i < len(outputs) else None
            if y is not None:
                up = F.interpolate(y, sizes[i], mode="bilinear", align_corners=False)
                f = up if f is None else f + up
            if f is None:
                continue
            y = self.decode[i](f) if i > 0 else f
        if y is None:  # every route closed: no features reach the decoder
            y = stem.new_zeros(b, self.config.width, *sizes[0])
        logits = self.resize(self.classifier(self.decode[0](y)), padded.shape[-2:])[..., :h, :w]
        if return_aux:
            return logits, {"cost": expected / total}
        return logits
