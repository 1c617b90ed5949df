"""Losses: cross-entropy with ignore, and the ladder loss with soft-histogram auxiliary targets.

Ladder loss (LDN): 0.6 x CE(final logits) + 0.4 x mean over auxiliary outputs. A coarse auxiliary
output of stride f is scored against the class histogram of each f x f cell of the labels (soft
targets, as in the authors' code), not a nearest-neighbour downsampled label; cells that are half
or more ignore are dropped.

Class balancing (optional) weights every pixel's loss by its class: median-frequency balancing
(Eigen & Fergus 2015, as SegNet trains on CamVid: w_c = median(f) / f_c, with f_c the class's
pixel share in the images where it appears) or ENet's w_c = 1 / ln(1.02 + p_c) (p_c its share of
all labelled pixels). Thin classes (pole, sign, bicyclist) then count as much as their rarity
costs them.

Lovász-softmax (Berman, Rannen Triki & Blaschko, CVPR 2018), optional and added to the loss with a
weight: the convex (Lovász) extension of each class's Jaccard loss 1 - IoU, evaluated on the
softmax probabilities of the batch's labelled pixels and averaged over the classes present in the
labels. On hard (0/1) predictions it equals the batch's mean 1 - IoU exactly; its gradient pushes
on the pixels that cost a class most IoU, so it optimises the mIoU that CE only approximates
(thin classes count as much as large ones).
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from bigseg.train.data import IGNORE


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


BALANCING = ("none", "median-frequency", "enet")


def class_weights(pixels: np.ndarray, image_pixels: np.ndarray, method: str) -> list[float] | None:
    """Per-class loss weights from label statistics: `pixels[c]`, the pixels of class c, and
    `image_pixels[c]`, the labelled pixels of the images where c appears (None for "none")."""
    if method == "none":
        return None
    if method not in BALANCING:
        raise ValueError(f"class balancing must be one of {', '.join(BALANCING)}, got {method!r}")
    pixels = np.asarray(pixels, np.float64)
    if method == "enet":
        share = pixels / max(pixels.sum(), 1.0)
        return [float(w) for w in 1.0 / np.log(1.02 + share)]
    freq = pixels / np.maximum(np.asarray(image_pixels, np.float64), 1.0)
    present = freq[freq > 0]
    median = float(np.median(present)) if present.size else 1.0
    return [float(median / f) if f > 0 else 1.0 for f in freq]


def soft_cross_entropy(logits: torch.Tensor, target: torch.Tensor, keep: torch.Tensor,
                       weight: torch.Tensor | None = None) -> torch.Tensor:
    """Cross-entropy against per-cell class distributions; with class weights, each cell counts
    by the weight of its target distribution (the soft analogue of weighted cross-entropy)."""
    loss = -(target * F.log_softmax(logits.float(), 1)).sum(1)
    cell = keep.float()
    if weight is not None:
        cell = cell * (target * weight.view(1, -1, 1, 1)).sum(1)
    return (loss * cell).sum() / cell.sum().clamp_min(1e-6)


def segmentation_loss(logits: torch.Tensor, labels: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
    return F.cross_entropy(logits.float(), labels, weight=weight, ignore_index=IGNORE)


def ladder_loss(logits: torch.Tensor, aux: list[torch.Tensor], labels: torch.Tensor,
                aux_weight: float = 0.4, weight: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, float]]:
    """(1 - aux_weight) x final CE + aux_weight x mean of the auxiliary soft CEs."""
    main = segmentation_loss(logits, labels, weight)
    if not aux or aux_weight == 0:
        return main, {"main": main.item()}
    aux_losses = [soft_cross_entropy(a, *soft_targets(labels, a.shape[1], a.shape[-2:]), weight) for a in aux]
    aux_mean = torch.stack(aux_losses).mean()
    return (1 - aux_weight) * main + aux_weight * aux_mean, {"main": main.item(), "aux": aux_mean.item()}


def lovasz_softmax(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Lovász-softmax over the labelled pixels of logits (N, C, H, W) and labels (N, H, W): the mean
    over the classes present in `labels` of the Lovász extension of 1 - IoU (0 when none are)."""
    c = logits.shape[1]
    probs = F.softmax(logits.float(), 1).transpose(0, 1).reshape(c, -1)   # (C, P): rows sort fastest
    labels = labels.reshape(-1)
    keep = labels != IGNORE
    probs, labels = probs[:, keep], labels[keep]
    present = torch.bincount(labels, minlength=c) > 0
    if not present.any():
        return logits.sum() * 0.0
    classes = present.nonzero()[:, 0]
    fg = (labels.unsqueeze(0) == classes.unsqueeze(1)).float()           # (K, P) for the K present classes
    errors, order = (fg - probs[classes]).abs().sort(1, descending=True)
    fg = fg.gather(1, order)
    total = fg.sum(1, keepdim=True)
    # Jaccard loss with the first k errors taken as the mispredicted set, and its increments
    jaccard = 1.0 - (total - fg.cumsum(1)) / (total + (1.0 - fg).cumsum(1))
    grad = torch.cat([jaccard[:, :1], jaccard[:, 1:] - jaccard[:, :-1]], 1)
    return (errors * grad).sum(1).mean()


def budget_loss(cost: torch.Tensor, lam: float, mu: float, progress: float, start: float = 0.4,
                warmup: float = 0.02) -> torch.Tensor:
    """Dynamic Routing's budget constraint lam * (C_exp / C_all - mu)^2 on the batch's mean
    expected cost ratio, off before `start` of training and ramped linearly over `warmup`."""
    ramp = min(1.0, max(0.0, (progress - start) / warmup)) if warmup > 0 else float(progress >= start)
    return lam * ramp * (cost.float().mean() - mu) ** 2


def model_loss(model, logits: torch.Tensor, aux, labels: torch.Tensor, progress: float,
               aux_weight: float, weight: torch.Tensor | None = None,
               lovasz: float = 0.0) -> tuple[torch.Tensor, dict[str, float]]:
    """The training loss of `model` (by its `loss_kind`) at `progress` (0..1) of the schedule,
    with optional per-class `weight`s, plus `lovasz` x the Lovász-softmax of the final logits."""
    loss, parts = _kind_loss(model, logits, aux, labels, progress, aux_weight, weight)
    if lovasz:
        term = lovasz_softmax(logits, labels)
        loss, parts = loss + lovasz * term, {**parts, "lovasz": term.item()}
    return loss, parts


def distil_loss(loss: torch.Tensor, parts: dict[str, float], logits: torch.Tensor, target: torch.Tensor,
                weight: float) -> tuple[torch.Tensor, dict[str, float]]:
    """`loss` plus `weight` x the soft cross-entropy of the final logits against a teacher's
    probabilities `target` (N, C, H, W), over the pixels the teacher saw (the crop's padding has
    all-zero targets). Void pixels count: the teacher labels them too."""
    term = soft_cross_entropy(logits, target, target.sum(1) > 0.5)
    return loss + weight * term, {**parts, "distil": term.item()}


def _kind_loss(model, logits, aux, labels, progress, aux_weight, weight):
    kind = getattr(model, "loss_kind", "ce")
    if kind == "ladder":
        return ladder_loss(logits, aux, labels, aux_weight, weight)
    if kind == "msc" and aux:  # DeepLab v2: a loss on the max-fused logits and on every scale
        fused = segmentation_loss(logits, labels, weight)
        scales = [segmentation_loss(a, labels, weight) for a in aux]
        return fused + sum(scales), {"main": fused.item(), "scales": float(sum(s.item() for s in scales))}
    main = segmentation_loss(logits, labels, weight)
    if kind == "budget":
        c = model.config
        budget = budget_loss(aux["cost"], c.budget_lambda, c.budget_mu, progress, c.budget_start, c.budget_warmup)
        return main + budget, {"main": main.item(), "budget": budget.item(), "cost": aux["cost"].mean().item()}
    return main, {"main": main.item()}
