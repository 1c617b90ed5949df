"""Building blocks shared by the decoders: pre-activation convolutions, padding, checkpoint helpers."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint


class BNReLUConv(nn.Sequential):
    """Pre-activation unit BN -> ReLU -> Conv, the unit of the ladder and SPP boxes (LDN, SwiftNet)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 1, bias: bool = False):
        super().__init__()
        self.norm = nn.BatchNorm2d(in_channels)
        self.relu = nn.ReLU(inplace=True)
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=bias)


def pad_to_multiple(x: torch.Tensor, multiple: int) -> tuple[torch.Tensor, tuple[int, int]]:
    """Pad bottom and right so both sides are multiples of `multiple` (reflect, replicate if too small).

    Returns the padded tensor and the original (height, width) to crop back to; never resizes.
    """
    h, w = x.shape[-2:]
    ph, pw = (-h) % multiple, (-w) % multiple
    if ph == 0 and pw == 0:
        return x, (h, w)
    mode = "reflect" if ph < h and pw < w else "replicate"
    return F.pad(x, (0, pw, 0, ph), mode=mode), (h, w)


def checkpoint_momentum(momentum: float) -> float:
    """BatchNorm momentum that, applied twice (forward and recompute), equals `momentum` applied once.

    (1 - m')^2 = 1 - m, so m' = 1 - sqrt(1 - m): the correction used by the LDN authors' code.
    """
    return 1.0 - math.sqrt(1.0 - momentum)


class Checkpointable(nn.Module):
    """A module whose forward may be recomputed in backward instead of storing its activations.

    Subclasses implement `compute(*inputs)`; when `checkpointing` is on, in training with gradients
    enabled, only the inputs and the output are kept and `compute` runs again during backward.
    """

    checkpointing: bool = False

    def compute(self, *inputs: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        if self.checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(self.compute, *inputs, use_reentrant=False, preserve_rng_state=True)
        return self.compute(*inputs)


def set_grad_checkpointing(model: nn.Module, enabled: bool, only: tuple[type, ...] = ()) -> int:
    """Turn recomputation on or off in every `Checkpointable` of `model` (or only those of the
    `only` types); returns how many changed.

    Batchnorms inside a recomputed unit run forward twice per step, so their momentum is set to
    1 - sqrt(1 - m) while checkpointing and restored afterwards: running statistics then equal
    those of a plain step.
    """
    count = 0
    for module in model.modules():
        if not isinstance(module, Checkpointable) or module.checkpointing == enabled:
            continue
        if only and not isinstance(module, only):
            continue
        module.checkpointing = enabled
        count += 1
        for bn in _recomputed_batchnorms(module):
            if bn.momentum is not None:
                if enabled:
                    bn._bigseg_momentum = bn.momentum
                    bn.momentum = checkpoint_momentum(bn.momentum)
                else:
                    bn.momentum = getattr(bn, "_bigseg_momentum", bn.momentum)
    return count


def _recomputed_batchnorms(unit: nn.Module):
    """Batchnorms that belong to `unit` itself, not to a nested `Checkpointable` (which owns its own)."""
    for child in unit.children():
        if isinstance(child, nn.modules.batchnorm._BatchNorm):
            yield child
        elif not isinstance(child, Checkpointable):
            yield from _recomputed_batchnorms(child)


def init_weights(module: nn.Module) -> None:
    """Kaiming-normal convolutions, unit batchnorms (as in the LDN reference initialisation)."""
    for m in module.modules():
        if any(p.is_meta for p in m.parameters(recurse=False)):
            continue  # built on the meta device to count or trace: there is nothing to initialise
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.modules.batchnorm._BatchNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
