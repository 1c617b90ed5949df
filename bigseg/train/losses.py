"""Losses: cross-entropy with ignore, and the ladder loss with soft-histogram auxiliary targets.

Ladder loss (LDN): 0.6 x CE(final logits) + 0.4 x mean over auxiliary outputs. A coarse auxiliary
output of stride f is scored against the class histogram of each f x f cell of the labels (soft
targets, as in the authors' code), not a nearest-neighbour downsampled label; cells that are half
or more ignore are dropped.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from bigseg.train.datasets import IGNORE


def soft_targets(labels: torch.Tensor, num_classes: int, size: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-cell class histograms (N, C, h, w) and the cells to score (N, h, w) for labels (N, H, W).

    Labels are padded with ignore to a multiple of the cell size first (as the model pads images).
    """
    h, w = size
    fy, fx = -(-labels.shape[-2] // h), -(-labels.shape[-1] // w)
    labels = F.pad(labels, (0, w * fx - labels.shape[-1], 0, h * fy - labels.shape[-2]), value=IGNORE)
    classes = torch.where(labels == IGNORE, num_classes, labels)
    onehot = F.one_hot(classes, num_classes + 1).permute(0, 3, 1, 2).float()
    hist = F.avg_pool2d(onehot, (fy, fx))
    keep = hist[:, num_classes] < 0.5
    target = hist[:, :num_classes]
    return target / target.sum(1, keepdim=True).clamp_min(1e-6), keep


def soft_cross_entropy(logits: torch.Tensor, target: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    loss = -(target * F.log_softmax(logits.float(), 1)).sum(1)
    return (loss * keep).sum() / keep.sum().clamp_min(1)


def segmentation_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.float(), labels, ignore_index=IGNORE)


def ladder_loss(logits: torch.Tensor, aux: list[torch.Tensor], labels: torch.Tensor,
                aux_weight: float = 0.4) -> tuple[torch.Tensor, dict[str, float]]:
    """(1 - aux_weight) x final CE + aux_weight x mean of the auxiliary soft CEs."""
    main = segmentation_loss(logits, labels)
    if not aux or aux_weight == 0:
        return main, {"main": main.item()}
    aux_losses = [soft_cross_entropy(a, *soft_targets(labels, a.shape[1], a.shape[-2:])) for a in aux]
    aux_mean = torch.stack(aux_losses).mean()
    return (1 - aux_weight) * main + aux_weight * aux_mean, {"main": main.item(), "aux": aux_mean.item()}


def budget_loss(cost: torch.Tensor, lam: float, mu: float, progress: float, start: float = 0.4,
                warmup: float = 0.02) -> torch.Tensor:
    """Dynamic Routing's budget constraint lam * (C_exp / C_all - mu)^2 on the batch's mean
    expected cost ratio, off before `start` of training and ramped linearly over `warmup`."""
    ramp = min(1.0, max(0.0, (progress - start) / warmup)) if warmup > 0 else float(progress >= start)
    return lam * ramp * (cost.float().mean() - mu) ** 2


def model_loss(model, logits: torch.Tensor, aux, labels: torch.Tensor, progress: float,
               aux_weight: float) -> tuple[torch.Tensor, dict[str, float]]:
    """The training loss of `model` (by its `loss_kind`) at `progress` (0..1) of the schedule."""
    kind = getattr(model, "loss_kind", "ce")
    if kind == "ladder":
        return ladder_loss(logits, aux, labels, aux_weight)
    main = segmentation_loss(logits, labels)
    if kind == "budget":
        c = model.config
        budget = budget_loss(aux["cost"], c.budget_lambda, c.budget_mu, progress, c.budget_start, c.budget_warmup)
        return main + budget, {"main": main.item(), "budget": budget.item(), "cost": aux["cost"].mean().item()}
    return main, {"main": main.item()}
