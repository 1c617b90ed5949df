"""Samplers choose the windows an epoch reads; `EpochView` reads and augments them (a torch-style
data set, picklable for data workers).

- `WholeImages`: image folders. An epoch is the images in a random order; each is read whole and
  augmented by random scale and crop (the ladder/SwiftNet recipe).
- `RandomWindows`: raster scenes. Each sample draws a region in proportion to its labelled area,
  a scale, then a window of the crop's size / scale inside that region, centred on a cell drawn in
  proportion to its labelled pixels (a coarse coverage map made once, so no read is wasted on a
  nodata or unlabelled area); a window that is still mostly unlabelled is drawn again. With
  rare-class sampling (a temperature T) each sample first draws a class, class c with probability
  proportional to exp((1 - f_c) / T) where f_c is its share of the training pixels (DAFormer's
  rare class sampling, Hoyer et al. 2022), then a region and a cell in proportion to that class's
  pixels: windows are centred on rare classes far more often than their area would have them.
  With scene balance B, scene s is drawn in proportion to (its labelled area)^(1 - B) instead: 0
  by area, 1 every scene alike (a small scene unlike the large ones is not drowned by them).
- `GridWindows` (in `source.region_windows`): a non-overlapping grid for statistics; evaluation
  runs the tiled predictor over each whole validation region.

A sample's choices come from a generator seeded by (seed, epoch, index): the same batches whatever
the number of workers, and after a resume.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from bigseg.errors import DatasetError
from bigseg.tiling.geometry import Window
from bigseg.train.data.classes import IGNORE
from bigseg.train.data.source import Region, Source, region_windows
from bigseg.train.transforms import Augment, apply, augment, sample_rng, window_draw

MAX_CELLS = 1 << 20      # cells of one region's coverage map (bounded whatever the region's size)
MIN_CELL = 16
MIN_LABELLED = 0.5       # a window with less than this share of labelled pixels is drawn again
TRIES = 20


@dataclass
class Coverage:
    """Labelled pixels per `cell` x `cell` square of a region (row-major from its corner), with its
    cumulative sums for drawing cells and a summed-area table for a window's labelled share."""

    bounds: Window
    cell: int
    counts: np.ndarray  # int32 (rows, cols)
    class_counts: np.ndarray | None = None  # int32 (classes, rows, cols), for rare-class sampling

    def __post_init__(self):
        self.cumulative = np.cumsum(self.counts.ravel(), dtype=np.int64)
        table = np.zeros((self.counts.shape[0] + 1, self.counts.shape[1] + 1), np.int64)
        table[1:, 1:] = self.counts.cumsum(0).cumsum(1)
        self.table = table
        self.class_cumulative = None if self.class_counts is None else np.cumsum(
            self.class_counts.reshape(len(self.class_counts), -1), axis=1, dtype=np.int64)

    def class_pixels(self) -> np.ndarray:
        """Pixels of each class in the region (int64, one per class)."""
        return self.class_cumulative[:, -1]

    @property
    def labelled(self) -> int:
        return int(self.cumulative[-1]) if len(self.cumulative) else 0

    def share(self, window: Window) -> float:
        """Estimated labelled share of `window` (whole cells, rounded outwards)."""
        b, c = self.bounds, self.cell
        r0, c0 = (window.row_off - b.row_off) // c, (window.col_off - b.col_off) // c
        r1, c1 = -(-(window.row_end - b.row_off) // c), -(-(window.col_end - b.col_off) // c)
        t = self.table
        labelled = t[r1, c1] - t[r0, c1] - t[r1, c0] + t[r0, c0]
        area = min((r1 - r0) * c, b.height) * min((c1 - c0) * c, b.width)
        return float(labelled) / max(area, 1)


def coverage(source: Source, region: Region, scan: int = 2048, classes: int = 0) -> Coverage:
    """The coverage map of `region`, from one pass over its labels in windows of about `scan` px;
    with `classes`, each class's pixels per cell too (a coarser cell, at most MAX_CELLS // classes)."""
    b = source.bounds(region)
    cells = MAX_CELLS // max(classes, 1)
    cell = max(MIN_CELL, math.ceil(math.sqrt(b.width * b.height / cells) / MIN_CELL) * MIN_CELL)
    rows, cols = -(-b.height // cell), -(-b.width // cell)
    counts = np.zeros((rows, cols), np.int32)
    class_counts = np.zeros((classes, rows, cols), np.int32) if classes else None
    step = max(cell, scan // cell * cell)

    def per_cell(mask: np.ndarray) -> np.ndarray:
        h, wd = mask.shape
        padded = np.pad(mask.astype(np.int32), ((0, -h % cell), (0, -wd % cell)))
        return padded.reshape(padded.shape[0] // cell, cell, padded.shape[1] // cell, cell).sum((1, 3))

    for w in region_windows(b, step):
        label = source.read_label(region.item, w)
        r0, c0 = (w.row_off - b.row_off) // cell, (w.col_off - b.col_off) // cell
        if classes:  # labels are 0 .. classes - 1 or IGNORE: the labelled count is the classes' sum
            per_class = np.stack([per_cell(label == c) for c in range(classes)])
            class_counts[:, r0:r0 + per_class.shape[1], c0:c0 + per_class.shape[2]] = per_class
            labelled = per_class.sum(0)
        else:
            labelled = per_cell(label != IGNORE)
        counts[r0:r0 + labelled.shape[0], c0:c0 + labelled.shape[1]] = labelled
    return Coverage(b, cell, counts, class_counts)


@dataclass(frozen=True)
class SamplerOptions:
    """What training asks of a sampler: windows of `crop` pixels, corners and sides multiples of
    `align`; `rare_classes` (T) and `scene_balance` (B) as `RandomWindows` takes them; windows an
    epoch: `per_epoch`, else the labelled area over crop^2, at least `at_least` (one batch)."""

    crop: int
    align: int = 1
    rare_classes: float = 0.0
    scene_balance: float = 0.0
    per_epoch: int | None = None
    at_least: int = 1


class WholeImages:
    """Every image of the regions once an epoch, in a random order."""

    def __init__(self, regions: list[Region]):
        self.items = [r.item for r in regions]

    def __len__(self) -> int:
        return len(self.items)

    def epoch(self, seed: int, epoch: int) -> list[int]:
        """The sample keys of `epoch` in order: item indices."""
        return [self.items[k] for k in np.random.default_rng([seed, epoch]).permutation(len(self.items))]


class RandomWindows:
    """`per_epoch` random windows of the regions' labelled areas; window corners and sides are
    multiples of `align` (a teacher's reduction, so its kept targets slice exactly)."""

    def __init__(self, source: Source, regions: list[Region], per_epoch: int, align: int = 1,
                 rare_classes: float = 0.0, classes: int = 0, scene_balance: float = 0.0):
        """`rare_classes`: the temperature T of rare-class sampling over `classes` classes (0: off);
        `scene_balance` B: each scene's pixels weigh (its labelled area)^-B (0: by area, 1: scenes alike)."""
        self.maps = [coverage(source, r, classes=classes if rare_classes else 0) for r in regions]
        self.regions = [r for r, m in zip(regions, self.maps) if m.labelled > 0]
        self.maps = [m for m in self.maps if m.labelled > 0]
        if not self.regions:
            raise DatasetError(f"{source.name}: the training scenes hold no labelled pixel where the images have data")
        scene_pixels: dict[int, int] = {}
        for r, m in zip(self.regions, self.maps):  # a scene's blocks are one scene
            scene_pixels[r.item] = scene_pixels.get(r.item, 0) + m.labelled
        factor = np.array([float(scene_pixels[r.item]) ** -scene_balance for r in self.regions])
        self.weights = np.cumsum([m.labelled * f for m, f in zip(self.maps, factor)], dtype=np.float64)
        self.per_epoch, self.align = per_epoch, align
        self.class_probabilities = self.class_weights = self.class_choice = None
        if rare_classes:
            pixels = np.stack([m.class_pixels() for m in self.maps])  # (regions, classes)
            share = pixels.sum(0) / pixels.sum()
            logits = np.where(share > 0, (1 - share) / rare_classes, -np.inf)
            probabilities = np.exp(logits - logits.max())
            self.class_probabilities = probabilities / probabilities.sum()
            self.class_choice = np.cumsum(self.class_probabilities)
            self.class_weights = np.cumsum(pixels.T * factor, axis=1, dtype=np.float64)  # (classes, regions)

    def scene_shares(self) -> dict[int, float]:
        """The share of windows drawn from each scene (item), without rare-class sampling."""
        drawn = np.diff(self.weights, prepend=0.0) / self.weights[-1]
        shares: dict[int, float] = {}
        for r, p in zip(self.regions, drawn):
            shares[r.item] = shares.get(r.item, 0.0) + float(p)
        return shares

    @property
    def labelled(self) -> int:
        return sum(m.labelled for m in self.maps)

    def __len__(self) -> int:
        return self.per_epoch

    def epoch(self, seed: int, epoch: int) -> list[int]:
        """The sample keys of `epoch`: 0 .. per_epoch - 1 (each draws its own window)."""
        return list(range(self.per_epoch))

    def draw(self, rng: np.random.Generator, crop: int, scale_min: float, scale_max: float
             ) -> tuple[int, Window, float]:
        """(item, window, scale): the window is crop / scale pixels (less where the region is)."""
        if self.class_probabilities is None:
            c = None
            k = int(np.searchsorted(self.weights, rng.random() * self.weights[-1], side="right"))
        else:
            c = int(np.searchsorted(self.class_choice, rng.random() * self.class_choice[-1], side="right"))
            k = int(np.searchsorted(self.class_weights[c], rng.random() * self.class_weights[c, -1], side="right"))
        region, cover = self.regions[k], self.maps[k]
        cells = cover.cumulative if c is None else cover.class_cumulative[c]
        b, a = cover.bounds, self.align
        scale = rng.uniform(scale_min, scale_max)
        side = max(a, round(crop / scale / a) * a)
        w, h = min(side, b.width // a * a or b.width), min(side, b.height // a * a or b.height)
        best, best_share = None, -1.0
        for _ in range(TRIES):
            cell = int(np.searchsorted(cells, rng.random() * cells[-1], side="right"))
            cy, cx = divmod(cell, cover.counts.shape[1])
            y = b.row_off + (cy + rng.random()) * cover.cell - h / 2
            x = b.col_off + (cx + rng.random()) * cover.cell - w / 2
            y = int(min(max(round(y / a) * a, b.row_off), b.row_end - h))
            x = int(min(max(round(x / a) * a, b.col_off), b.col_end - w))
            window = Window(x, y, w, h)
            share = cover.share(window)
            if share > best_share:
                best, best_share = window, share
            if share >= MIN_LABELLED:
                break
        return region.item, best, crop / side


class EpochView:
    """One epoch of training samples (`[k]` -> image, label[, teacher target] tensors as numpy)."""

    def __init__(self, source: Source, sampler, keys: list[int], aug: Augment, seed: int, epoch: int,
                 targets=None):
        self.source, self.sampler, self.keys = source, sampler, keys
        self.aug, self.seed, self.epoch, self.targets = aug, seed, epoch, targets

    def __len__(self) -> int:
        return len(self.keys)

    def __getitem__(self, i: int):
        key = self.keys[i]
        rng = sample_rng(self.seed, self.epoch, key)
        if isinstance(self.sampler, WholeImages):
            patch = self.source.read(key)
            target = None if self.targets is None else self.targets.window(key, None)
            return augment(patch.hwc(), patch.label, self.aug, rng, target)
        item, window, scale = self.sampler.draw(rng, self.aug.crop, self.aug.scale_min, self.aug.scale_max)
        patch = self.source.read(item, window)
        target = None if self.targets is None else self.targets.window(item, window)
        d = window_draw(self.aug, rng, scale, window.height, window.width, patch.image.shape[0])
        return apply(patch.hwc(), patch.label, self.aug, d, target)
