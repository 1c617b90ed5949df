"""Training augmentation as in the ladder/SwiftNet papers: random scale (0.5 to 2), random crop
with ignore padding, horizontal flip, optional photometric jitter.

Each sample draws from its own generator seeded by (seed, epoch, index), so the augmented batch
is the same whatever the number of worker processes and after a resume.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from bigseg.datasets import IGNORE


@dataclass(frozen=True)
class Augment:
    crop: int = 448
    scale_min: float = 0.5
    scale_max: float = 2.0
    flip: bool = True
    jitter: float = 0.0  # max relative change of brightness, contrast and saturation


def sample_rng(seed: int, epoch: int, index: int) -> np.random.Generator:
    return np.random.default_rng([seed, epoch, index])


def augment(image: np.ndarray, label: np.ndarray, aug: Augment, rng: np.random.Generator
            ) -> tuple[np.ndarray, np.ndarray]:
    """(H, W, 3) uint8 + (H, W) uint8 -> (3, crop, crop) float32 in 0..255 + (crop, crop) int64."""
    import cv2

    s = rng.uniform(aug.scale_min, aug.scale_max)
    h, w = label.shape
    size = (max(1, round(w * s)), max(1, round(h * s)))
    if size != (w, h):
        image = cv2.resize(image, size, interpolation=cv2.INTER_LINEAR if s > 1 else cv2.INTER_AREA)
        label = cv2.resize(label, size, interpolation=cv2.INTER_NEAREST)
    image = image.astype(np.float32)
    h, w = label.shape
    c = aug.crop
    ph, pw = max(0, c - h), max(0, c - w)
    if ph or pw:  # pad with ignore; the padded image area is never scored
        image = np.pad(image, ((0, ph), (0, pw), (0, 0)))
        label = np.pad(label, ((0, ph), (0, pw)), constant_values=IGNORE)
    y = int(rng.integers(0, label.shape[0] - c + 1))
    x = int(rng.integers(0, label.shape[1] - c + 1))
    image, label = image[y:y + c, x:x + c], label[y:y + c, x:x + c]
    if aug.flip and rng.random() < 0.5:
        image, label = image[:, ::-1], label[:, ::-1]
    if aug.jitter > 0:
        image = _jitter(image, aug.jitter, rng)
    return np.ascontiguousarray(image.transpose(2, 0, 1)), np.ascontiguousarray(label).astype(np.int64)


def _jitter(image: np.ndarray, amount: float, rng: np.random.Generator) -> np.ndarray:
    b, c, s = rng.uniform(1 - amount, 1 + amount, 3)
    gray = image @ np.array([0.299, 0.587, 0.114], np.float32)
    image = image * b
    image = (image - image.mean()) * c + image.mean()
    image = (image - gray[..., None] * b) * s + gray[..., None] * b
    return np.clip(image, 0, 255).astype(np.float32)


class AugmentedView:
    """A torch-style dataset over `indices` of `dataset` for one epoch (picklable for workers)."""

    def __init__(self, dataset, indices: list[int], aug: Augment, seed: int, epoch: int):
        self.dataset, self.indices, self.aug, self.seed, self.epoch = dataset, indices, aug, seed, epoch

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int):
        index = self.indices[i]
        image, label = self.dataset[index]
        return augment(image, label, self.aug, sample_rng(self.seed, self.epoch, index))
