"""Parameter and multiply-add counts, as the papers report them ("GFLOPs" = multiply-adds in the
LDN lab's papers)."""
from __future__ import annotations

import torch
from torch import nn


def count_parameters(model: nn.Module, inference_only: bool = True) -> int:
    """Parameters used at inference (auxiliary training heads excluded when `inference_only`)."""
    return sum(p.numel() for name, p in model.named_parameters()
               if not (inference_only and name.startswith("aux_")))


def count_macs(model: nn.Module, height: int, width: int, in_channels: int = 3) -> int:
    """Multiply-adds of one forward pass at height x width (torch's FLOP counter / 2)."""
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.zeros(1, in_channels, height, width, device="meta")
    with torch.device("meta"), torch.no_grad(), FlopCounterMode(display=False) as counter:
        model.to("meta").eval()(x)
    return counter.get_total_flops() // 2
