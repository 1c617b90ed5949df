"""VGG-16 (Simonyan & Zisserman 2015) with torchvision's parameter names, as DeepLab v1 turns it
into DeepLab-LargeFOV (Chen et al., ICLR 2015, Sec. 3.1 and Table 2):

- pool1..pool3: 3x3 max-pools with stride 2 and padding 1 (the Caffe model's), pool4 and pool5 at
  stride 1, so the network's output stride is 8;
- conv5_1..conv5_3 dilated by 2 (the skipped pool4 subsampling);
- fc6 becomes a 3x3 convolution with 1024 filters at dilation 12 (the "large field of view"),
  fc7 a 1x1 convolution with 1024 filters, each followed by ReLU and dropout 0.5.

ImageNet weights saved from torchvision load by name (`features.N`); torchvision's 4096-wide
7x7 fc6 and fc7 are decimated to DeepLab's sizes as the paper does (every 4th filter, every third
tap of the 7x7 kernel).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

CONV_WIDTHS = ((64, 64), (128, 128), (256, 256, 256), (512, 512, 512), (512, 512, 512))


@dataclass(frozen=True)
class VGGConfig:
    fc_width: int = 1024    # DeepLab's fc6/fc7 width (torchvision's VGG: 4096)
    fc6_dilation: int = 12  # LargeFOV; DeepLab v1's other variants use 4 (with a 4x4 kernel)
    fc6_kernel: int = 3
    dropout: float = 0.5


class VGG16(nn.Module):
    """VGG-16 features at output stride 8 plus DeepLab's fc6/fc7. `forward` returns the maps after
    pool2 (stride 4), pool3 (stride 8) and fc7 (stride 8); `feature_info` their channels."""

    def __init__(self, config: VGGConfig | None = None, in_channels: int = 3):
        super().__init__()
        c = self.config = config or VGGConfig()
        layers: list[nn.Module] = []
        channels = in_channels
        self._taps: list[int] = []
        for stage, widths in enumerate(CONV_WIDTHS):
            dilation = 2 if stage == 4 else 1  # conv5 runs where pool4 no longer subsamples
            for width in widths:
                layers += [nn.Conv2d(channels, width, 3, padding=dilation, dilation=dilation), nn.ReLU(inplace=True)]
                channels = width
            stride = 2 if stage < 3 else 1
            layers.append(nn.MaxPool2d(3, stride, 1))
            self._taps.append(len(layers) - 1)
        self.features = nn.Sequential(*layers)  # indices as torchvision's vgg16().features
        pad = c.fc6_dilation * (c.fc6_kernel // 2)
        self.fc6 = nn.Conv2d(512, c.fc_width, c.fc6_kernel, padding=pad, dilation=c.fc6_dilation)
        self.fc7 = nn.Conv2d(c.fc_width, c.fc_width, 1)
        self.relu = nn.ReLU(inplace=True)
        self.dropout = nn.Dropout2d(c.dropout)
        self.feature_info = [{"channels": 128, "reduction": 4}, {"channels": 256, "reduction": 8},
                             {"channels": c.fc_width, "reduction": 8}]

    @property
    def output_stride(self) -> int:
        return 8

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        out = []
        for i, layer in enumerate(self.features):
            x = layer(x)
            if i in (self._taps[1], self._taps[2]):
                out.append(x)
        x = self.dropout(self.relu(self.fc6(x)))
        out.append(self.dropout(self.relu(self.fc7(x))))
        return out

    def from_pretrained(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """torchvision's vgg16 state dict in this module's names: `features.N` as they are, fc6 and
        fc7 decimated from the classifier's 4096 x (512 x 7 x 7) and 4096 x 4096 (DeepLab v1 Sec. 4.1)."""
        out = {k: v for k, v in state.items() if k.startswith("features.")}
        if "classifier.0.weight" in state and "classifier.3.weight" in state:
            c = self.config
            keep = state["classifier.0.weight"].shape[0] // c.fc_width
            taps = torch.linspace(0, 6, c.fc6_kernel).round().long()
            fc6 = state["classifier.0.weight"].view(-1, 512, 7, 7)[::keep][:, :, taps][:, :, :, taps]
            out["fc6.weight"] = fc6.contiguous()
            out["fc6.bias"] = state["classifier.0.bias"][::keep].clone()
            out["fc7.weight"] = state["classifier.3.weight"][::keep, ::keep].reshape(c.fc_width, c.fc_width, 1, 1).clone()
            out["fc7.bias"] = state["classifier.3.bias"][::keep].clone()
        return out
