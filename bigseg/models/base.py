"""What every segmentation model offers the rest of bigseg, and flat configs that round-trip
through checkpoints.

A model's `forward(x)` returns logits of x's size; `forward(x, return_aux=True)` returns
`(logits, aux)` where `aux` is whatever its training loss needs (named by `loss_kind`, computed
in `bigseg.train.losses`). `context_margin` is the margin in input pixels beyond which a pixel's
prediction no longer changes (its effective receptive field, rounded up), or None where some
part of the model sees the whole input (global pooling): tiling uses it to pick the overlap.
"""
from __future__ import annotations

from dataclasses import asdict, fields
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn


class FlatConfig:
    """Mixin for frozen dataclasses of plain values (tuples stored as lists in JSON)."""

    @classmethod
    def from_dict(cls, d: dict[str, Any]):
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"{cls.__name__} has no setting {unknown[0]!r}; known: {', '.join(sorted(known))}")
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class SegmentationModel(nn.Module):
    """Base of the registered architectures (see the module docstring)."""

    loss_kind = "ce"
    output_multiple = 32
    context_margin: int | None = None

    def __init__(self, num_classes: int, in_channels: int, config: FlatConfig):
        super().__init__()
        self.num_classes, self.in_channels, self.config = num_classes, in_channels, config

    def prepare_training(self, labels: Sequence[np.ndarray], seed: int = 0) -> dict[str, Any]:
        """Fit whatever the model computes from the training labels (class-index maps, read as
        indexed) before optimisation (e.g. DUpsampling's reconstruction matrix); returns facts
        for the log."""
        return {}

    @staticmethod
    def resize(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        return nn.functional.interpolate(x, size, mode="bilinear", align_corners=False)
