"""DUpsampling (Tian, He, Shen, Yan, "Decoders Matter for Semantic Segmentation: Data-Dependent
Decoding Enables Flexible Feature Aggregation", CVPR 2019, arXiv 1903.02120) on a ResNet.

The decoder stays at the encoder's resolution (1/r): low-level features (ResNet's 1/4 and 1/8
maps, each projected to 48 channels) are *down*sampled to 1/r and concatenated with the deep
features, two 3x3 convs mix them, and a 1x1 conv (with bias) predicts a `compressed`-dim code per
cell. DUpsampling decodes the code into the r x r x C label patch with a fixed linear map W
(a 1x1 conv, then depth-to-space), and the logits are divided by a learnable temperature T
(adaptive-temperature softmax).

W is fitted before training from the training labels (`prepare_training`): with v the one-hot
r x r x C patches, W holds the top `compressed` eigenvectors of sum v v^T, the closed-form
(PCA) minimiser of sum ||v - W W^T v||^2 with orthonormal W. It is a buffer, so every
checkpoint carries it, and it is not optimised (learning it end to end collapses towards
nearest-neighbour upsampling, practitioners report).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from bigseg.models.base import FlatConfig, SegmentationModel
from bigseg.models.blocks import init_weights, pad_to_multiple
from bigseg.models.deeplab import conv_bn_relu
from bigseg.models.resnet import ResNet, ResNetConfig


@dataclass(frozen=True)
class DUpsamplingConfig(FlatConfig):
    depth: int = 50
    output_stride: int = 16    # = the DUpsampling ratio r
    compressed: int = 128      # code size per cell (the paper keeps it at 64 to 128)
    width: int = 256
    low_level_width: int = 48
    fit_patches: int = 100_000  # label patches sampled to fit W
    temperature: float = 1.0   # initial T


class DUpsample(nn.Module):
    """Code (N, K, h, w) -> logits (N, C, h r, w r) through the fixed reconstruction W (r^2 C x K)."""

    def __init__(self, compressed: int, num_classes: int, ratio: int):
        super().__init__()
        self.ratio, self.num_classes = ratio, num_classes
        n = ratio * ratio * num_classes
        if compressed > n:
            raise ValueError(f"compressed ({compressed}) cannot exceed r*r*classes ({n})")
        w = torch.linalg.qr(torch.randn(n, compressed, generator=torch.Generator().manual_seed(0)))[0] \
            if not torch.empty(0).is_meta else torch.empty(n, compressed)
        self.register_buffer("weight", w)
        self.register_buffer("fitted", torch.zeros((), dtype=torch.bool))

    def forward(self, code: torch.Tensor) -> torch.Tensor:
        patches = F.conv2d(code, self.weight[:, :, None, None].to(code.dtype))
        return F.pixel_shuffle(patches, self.ratio)

    def encode(self, onehot: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) one-hot labels -> (N, r*r*C, H/r, W/r) patch vectors, DUpsample's layout."""
        return F.pixel_unshuffle(onehot, self.ratio)


class DUpsamplingNet(SegmentationModel):
    # no global pooling: 99% of the effective receptive field lies within 172 px (ResNet-50,
    # OS 16, measured with `benchmarks/receptive_field.py` on 512 and 1024 px inputs alike)
    context_margin = 172
    def __init__(self, num_classes: int, in_channels: int = 3, config: DUpsamplingConfig | None = None):
        config = config or DUpsamplingConfig()
        super().__init__(num_classes, in_channels, config)
        self.backbone = ResNet(ResNetConfig(config.depth, config.output_stride), in_channels)
        info = self.backbone.feature_info
        self.deep = conv_bn_relu(info[-1]["channels"], config.width, 3)
        self.low_level = nn.ModuleList(conv_bn_relu(info[i]["channels"], config.low_level_width, 1) for i in (0, 1))
        self.mix = nn.Sequential(conv_bn_relu(config.width + 2 * config.low_level_width, config.width, 3),
                                 conv_bn_relu(config.width, config.width, 3))
        self.code = nn.Conv2d(config.width, config.compressed, 1, bias=True)
        self.dupsample = DUpsample(config.compressed, num_classes, config.output_stride)
        self.temperature = nn.Parameter(torch.tensor(float(config.temperature)))
        init_weights(self)

    def forward(self, x: torch.Tensor, return_aux: bool = False):
        padded, (h, w) = pad_to_multiple(x, self.output_multiple)
        features = self.backbone(padded)
        y = self.deep(features[-1])
        size = y.shape[-2:]
        low = [self.resize(proj(f), size) for proj, f in zip(self.low_level, features[:2])]
        code = self.code(self.mix(torch.cat([y, *low], 1)))
        logits = (self.dupsample(code) / self.temperature)[..., :h, :w]
        return (logits, None) if return_aux else logits

    @torch.no_grad()
    def prepare_training(self, labels: Sequence[np.ndarray], seed: int = 0, ignore: int = 255) -> dict[str, Any]:
        """Fit W by PCA on up to `fit_patches` r x r label patches without ignored pixels."""
        r, c = self.config.output_stride, self.num_classes
        rng = np.random.default_rng([seed, 1903])
        per_image = max(1, -(-self.config.fit_patches // max(1, len(labels))))
        gram = torch.zeros(r * r * c, r * r * c, dtype=torch.float64)
        samples, used = [], 0
        for i in range(len(labels)):
            label = labels[i]
            hh, ww = (label.shape[0] // r) * r, (label.shape[1] // r) * r
            cells = label[:hh, :ww].reshape(hh // r, r, ww // r, r).transpose(0, 2, 1, 3).reshape(-1, r, r)
            clean = cells[(cells != ignore).all((1, 2)) & (cells < c).all((1, 2))]
            if len(clean) > per_image:
                clean = clean[rng.choice(len(clean), per_image, replace=False)]
            if len(clean) == 0:
                continue
            v = self._patch_vectors(torch.from_numpy(clean.astype(np.int64)))
            gram += v.t() @ v
            samples.append(v[: max(1, 2000 // len(labels))])
            used += len(clean)
        if used == 0:
            raise ValueError(f"no {r}x{r} label patch without ignored pixels to fit DUpsampling's W")
        eigenvalues, eigenvectors = torch.linalg.eigh(gram)
        w = eigenvectors[:, -self.config.compressed:].flip(1).float()
        self.dupsample.weight.copy_(w.to(self.dupsample.weight.device))
        self.dupsample.fitted.fill_(True)
        held = torch.cat(samples).float()
        recon = (held @ w) @ w.t()
        truth = held.reshape(len(held), c, r * r).argmax(1)
        accuracy = (recon.reshape(len(held), c, r * r).argmax(1) == truth).float().mean().item()
        return {"dupsampling_patches": used, "dupsampling_reconstruction_acc": round(accuracy, 5),
                "dupsampling_energy_kept": round(float(eigenvalues[-self.config.compressed:].sum()
                                                       / eigenvalues.sum().clamp_min(1e-12)), 5)}

    def _patch_vectors(self, cells: torch.Tensor) -> torch.Tensor:
        """(P, r, r) class indices -> (P, r*r*C) one-hot vectors in DUpsample's channel order."""
        onehot = F.one_hot(cells, self.num_classes).permute(0, 3, 1, 2).double()  # (P, C, r, r)
        return self.dupsample.encode(onehot).reshape(len(cells), -1)
