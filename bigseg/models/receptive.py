"""How far a pixel's prediction looks: the effective receptive field (Luo et al. 2016) and the
tile overlap that follows from it.

`effective_margin` back-propagates the centre pixel's logits to the input and returns the
smallest square radius holding `mass` of the gradient's absolute sum. For a model of purely
local operations and mass 1 this is its receptive field radius; models with global pooling
(LDN's SPP, DeepLab's image pooling, Dynamic Routing's gates) see the whole tile, and their
effective margin says where almost all of the influence lies.

Tiling blends each tile with a weight that is zero within overlap/4 of its edges, so the
default overlap is 4 x the architecture's `context_margin` (`bigseg.tiling.geometry.default_overlap`).
"""
from __future__ import annotations

import torch
from torch import nn


def effective_margin(model: nn.Module, size: int = 256, mass: float = 0.99, in_channels: int = 3,
                     seed: int = 0) -> int:
    """Radius (pixels) around the centre of a `size` x `size` random input holding `mass` of
    |d logits(centre) / d input|, with the model in eval mode on its current device."""
    device = next(model.parameters()).device
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, in_channels, size, size, generator=g).to(device).requires_grad_(True)
    model.eval()
    with torch.enable_grad():
        y = model(x)
        c = size // 2
        y[0, :, c, c].abs().sum().backward()
    grad = x.grad[0].abs().sum(0).double()
    total = grad.sum()
    if total == 0:
        return 0
    ys, xs = torch.meshgrid(torch.arange(size, device=device), torch.arange(size, device=device), indexing="ij")
    dist = torch.maximum((ys - c).abs(), (xs - c).abs()).reshape(-1)
    per_radius = torch.zeros(size, dtype=torch.float64, device=device).index_add_(0, dist, grad.reshape(-1))
    cumulative = per_radius.cumsum(0) / total
    return int((cumulative < mass - 1e-9).sum().item())
