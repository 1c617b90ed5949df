"""What a training data set is: a source of items (images or raster scenes) that reads windows of
image bands, label and validity; regions (rectangles of items) that make up each split.

Every source reads its images through `bigseg.io.readers` with predict's rules (band selection,
value range, nodata, alpha and masks), so a model sees in training what it sees in prediction.
Samplers (`samplers.py`) choose which windows of the regions to read.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from bigseg.metrics import confusion
from bigseg.tiling.geometry import Window
from bigseg.train.data.classes import IGNORE, ClassTable


@dataclass(frozen=True)
class Region:
    """A rectangle of item `item` that belongs to a split (a block of a scene), or the whole item
    (`window` None: a whole image or scene)."""

    item: int
    window: Window | None = None


@dataclass
class Patch:
    """One window as the model learns from it: `image` (bands, h, w), uint8 for 8-bit data as
    stored and float32 in 0..255 otherwise; `label` (h, w) uint8 class indices with IGNORE where
    unlabelled, where the image has no data and outside the area of interest; `valid` (h, w):
    where the image has data."""

    image: np.ndarray
    label: np.ndarray
    valid: np.ndarray

    def hwc(self) -> np.ndarray:
        """The image as (h, w, bands), the layout OpenCV resamples."""
        return np.ascontiguousarray(self.image.transpose(1, 2, 0))


def as_model_input(data: np.ndarray, eight_bit: bool) -> np.ndarray:
    """A reader's float32 0..255 bands -> uint8 when they are 8-bit data used as stored (exact,
    a quarter of the bytes between processes), else unchanged."""
    return data.astype(np.uint8) if eight_bit else data


class Source:
    """Items (images or scenes) with a class table; `read(i, window)` gives a `Patch`. Each kind of
    data says here how it is read, sampled and scored, so nothing outside asks which kind it is:
    this base is the large rasters' way (regions read in windows, streamed through the predictor's
    tiles when scored, scores per scene); a source of small images read whole overrides it
    (`bigseg.train.data.folders.ImageFolder`).

    Subclasses set `name`, `table`, `channels`, `kind` (what data.json calls it), `unit` (what one
    training sample is: "windows" or "images"), `regions_are` (what a region is called), and
    `own_normalisation` (whether a run computes its bands' mean and spread from it), and define
    `sampler`."""

    name: str
    table: ClassTable
    channels: int
    kind: str = "scenes"
    unit: str = "windows"
    regions_are: str = "regions"
    own_normalisation: bool = True

    @property
    def classes(self) -> list[str]:
        return self.table.classes

    @property
    def palette(self) -> list[list[int]]:
        return [list(c) for c in self.table.palette]

    def __len__(self) -> int:  # pragma: no cover - every source defines it
        raise NotImplementedError

    def item_id(self, i: int) -> str:  # pragma: no cover
        """A stable name of item `i` (its image's resolved path)."""
        raise NotImplementedError

    def size(self, i: int) -> tuple[int, int]:  # pragma: no cover
        """(width, height) of item `i`."""
        raise NotImplementedError

    def read(self, i: int, window: Window | None = None) -> Patch:  # pragma: no cover
        """Window `window` (None: all) of item `i`."""
        raise NotImplementedError

    def empty(self, i: int, window: Window) -> bool:
        """True when `window` of item `i` certainly holds no image data, known without decoding
        (a sparse raster's absent blocks); False when that cannot be known cheaply."""
        return False

    def read_label(self, i: int, window: Window | None = None) -> np.ndarray:
        """The label of a window (IGNORE where the image has no data), without the image bands
        where the source can spare them."""
        return self.read(i, window).label

    def bounds(self, region: Region) -> Window:
        """The rectangle `region` covers, in its item's pixels."""
        if region.window is not None:
            return region.window
        w, h = self.size(region.item)
        return Window(0, 0, w, h)

    def extent(self, region: Region) -> Window | None:
        """The rectangle `region` is read in, or None where its image is read whole."""
        return self.bounds(region)

    def windows(self, region: Region, side: int) -> list[Window | None]:
        """Windows of at most `side` pixels covering `region` exactly once (None: the whole image)."""
        return list(region_windows(self.bounds(region), side))

    def scene_name(self, item: int) -> str | None:
        """The name item `item` is scored under on its own (None: only the overall score)."""
        return Path(self.item_id(item)).stem

    def describe_regions(self, regions: list[Region]) -> dict:
        """What data.json records of a split's regions beyond their number."""
        return {"list": [{"item": Path(self.item_id(r.item)).name,
                          **({} if r.window is None else {"window": [r.window.col_off, r.window.row_off,
                                                                     r.window.width, r.window.height]})}
                         for r in regions]}

    def input_description(self, regions: list[Region], value_range: tuple[float, float] | None) -> dict:
        """What a checkpoint trained on these regions says of its input, for predict."""
        return {}

    def sampler(self, regions: list[Region], options: Any) -> tuple[Any, list[str]]:  # pragma: no cover
        """The training sampler of `regions` (`bigseg.train.data.samplers.SamplerOptions`) and what
        to note of it."""
        raise NotImplementedError

    def confusion(self, predictor: Any, region: Region) -> np.ndarray:
        """The confusion matrix of `predictor` on `region`: its image streamed through the
        predictor's tiles, each finished block's labels compared with the same block of the labels;
        pixels without image data are not scored."""
        bounds, n = self.bounds(region), predictor.num_classes
        conf = np.zeros((n, n), np.int64)

        def read(window: Window):
            window = _offset(window, bounds)
            if self.empty(region.item, window):  # a sparse raster's absent blocks: no tile to predict
                return None
            patch = self.read(region.item, window)
            return patch.image.astype(np.float32), patch.valid

        finish = predictor.labels_and_probabilities(probs=False)
        for window, copy, valid in predictor.stream(predictor.grid(bounds.width, bounds.height), read, finish):
            if copy is None:  # no valid pixel in the block: nothing to score
                continue
            label = np.where(valid, self.read_label(region.item, _offset(window, bounds)), IGNORE)
            conf += confusion(copy.numpy()["labels"], label, n)
        return conf

    def close(self) -> None:
        pass


def _offset(window: Window, bounds: Window) -> Window:
    return Window(window.col_off + bounds.col_off, window.row_off + bounds.row_off, window.width, window.height)


def region_windows(r: Window, side: int) -> Iterator[Window]:
    """A non-overlapping grid of windows of at most `side` pixels covering `r` exactly once."""
    for y in range(r.row_off, r.row_end, side):
        for x in range(r.col_off, r.col_end, side):
            yield Window(x, y, min(side, r.col_end - x), min(side, r.row_end - y))


def label_statistics(source: Source, regions: list[Region], classes: int, side: int = 512
                     ) -> tuple[np.ndarray, np.ndarray]:
    """Pixels per class over the regions, and per class the labelled pixels of the images (whole
    images, or `side`-pixel windows of scenes) where it appears: the two counts class balancing
    needs (ENet's and SegNet's weights). IGNORE is left out of both."""
    pixels = np.zeros(classes, np.int64)
    image_pixels = np.zeros(classes, np.int64)
    for region in regions:
        for window in source.windows(region, side):
            counts = np.bincount(source.read_label(region.item, window).ravel(), minlength=256)[:classes]
            pixels += counts
            image_pixels += np.where(counts > 0, counts.sum(), 0)
    return pixels, image_pixels


def regions_overlap(a: list[Region], b: list[Region]) -> bool:
    """True when some pixel lies in a region of `a` and in one of `b`."""
    for ra in a:
        for rb in b:
            if ra.item == rb.item:
                x, y = ra.window, rb.window
                if x is None or y is None or x.col_off < y.col_end and y.col_off < x.col_end and x.row_off < y.row_end and y.row_off < x.row_end:
                    return True
    return False


__all__ = ["IGNORE", "Patch", "Region", "Source", "as_model_input", "label_statistics", "region_windows",
           "regions_overlap"]
