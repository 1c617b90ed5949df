"""Tile grid, blend window and the streaming stitcher. Knows arrays and windows, never models.

Geometry: tiles of `tile` x `tile` pixels step by `tile - overlap`; the last tile of a row or column
is shifted back to end flush with the image (no padding), and an image smaller than the tile is one
tile of the image's size. Blend window: along every tile edge that lies inside the image, the
weight is 0 over the outer quarter of the overlap, rises as sin^2 over the middle half and is 1
beyond; along image borders it is 1. Two neighbours at the nominal overlap therefore sum to exactly
1, and no pixel takes any weight from a tile in which it lies within overlap/4 of a cut: a model
whose receptive field reaches at most overlap/4 pixels stitches to the whole-image result.

Memory: tiles arrive in row-major order; rows above the next pending tile are final and leave the
stitcher at once, so it never holds more than one tile height of the image:
    stitcher bytes <= (channels + 1) * 4 * tile * width   (plus one band of the same size on output)
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterator

import numpy as np


@dataclass(frozen=True)
class Window:
    """A rectangle of pixels: columns [col_off, col_off + width), rows [row_off, row_off + height)."""

    col_off: int
    row_off: int
    width: int
    height: int

    @property
    def row_end(self) -> int:
        return self.row_off + self.height

    @property
    def col_end(self) -> int:
        return self.col_off + self.width

    @property
    def slices(self) -> tuple[slice, slice]:
        return slice(self.row_off, self.row_end), slice(self.col_off, self.col_end)


def axis_starts(length: int, tile: int, stride: int) -> list[int]:
    """Tile offsets along one axis: regular steps, the last one shifted to end at `length`."""
    if length <= tile:
        return [0]
    starts = list(range(0, length - tile, stride))
    return starts + [length - tile]


@dataclass(frozen=True)
class TileGrid:
    """All tiles covering a `width` x `height` image, in row-major order."""

    width: int
    height: int
    tile: int
    overlap: int

    def __post_init__(self):
        if self.tile < 1 or not 0 <= self.overlap < self.tile:
            raise ValueError(f"need tile >= 1 and 0 <= overlap < tile, got tile={self.tile} overlap={self.overlap}")

    @property
    def stride(self) -> int:
        return self.tile - self.overlap

    @property
    def tile_shape(self) -> tuple[int, int]:
        return min(self.tile, self.height), min(self.tile, self.width)

    @property
    def row_starts(self) -> list[int]:
        return axis_starts(self.height, self.tile, self.stride)

    @property
    def col_starts(self) -> list[int]:
        return axis_starts(self.width, self.tile, self.stride)

    def __len__(self) -> int:
        return len(self.row_starts) * len(self.col_starts)

    def __iter__(self) -> Iterator[Window]:
        th, tw = self.tile_shape
        for r in self.row_starts:
            for c in self.col_starts:
                yield Window(c, r, tw, th)

    def weights(self, window: Window) -> np.ndarray:
        """The blend window of one tile, shape (height, width), float32."""
        wy = edge_profile(window.height, window.row_off > 0, window.row_end < self.height, self.overlap)
        wx = edge_profile(window.width, window.col_off > 0, window.col_end < self.width, self.overlap)
        return np.outer(wy, wx)


def edge_profile(length: int, ramp_start: bool, ramp_end: bool, overlap: int) -> np.ndarray:
    """1-D blend weights of one tile side: dead zone overlap/4, sin^2 ramp over overlap/2, then 1."""
    w = np.ones(length, np.float32)
    dead = overlap // 4
    ramp = overlap - 2 * dead
    if ramp <= 0:
        return w
    rise = np.sin(0.5 * math.pi * (np.arange(ramp) + 0.5) / ramp) ** 2
    profile = np.concatenate([np.zeros(dead), rise]).astype(np.float32)
    n = min(len(profile), length)
    if ramp_start:
        w[:n] *= profile[:n]
    if ramp_end:
        w[length - n:] *= profile[:n][::-1]
    return w


class StreamingStitcher:
    """Blend per-tile scores (C, h, w) into full-width row bands, releasing rows as they finish.

    Feed every tile of `grid` in order through `add` (scores) or `skip` (nothing to blend, e.g. a
    tile that is all nodata); after each call, `pop_finished` yields (row_off, band) for rows no
    later tile touches, band of shape (C, rows, width) holding the weighted mean scores (0 where no
    tile gave weight).
    """

    def __init__(self, grid: TileGrid, channels: int):
        self.grid = grid
        self.channels = channels
        self._tiles = list(grid)
        self._next = 0
        self.top = 0
        cap = grid.tile_shape[0]
        self._acc = np.zeros((channels, cap, grid.width), np.float32)
        self._wsum = np.zeros((cap, grid.width), np.float32)

    @property
    def done(self) -> bool:
        return self.top >= self.grid.height

    def _expect(self, window: Window) -> None:
        if self._next >= len(self._tiles) or self._tiles[self._next] != window:
            expected = self._tiles[self._next] if self._next < len(self._tiles) else "no more tiles"
            raise ValueError(f"tiles must arrive in grid order: got {window}, expected {expected}")
        self._next += 1

    def add(self, window: Window, scores: np.ndarray) -> None:
        self._expect(window)
        if scores.shape != (self.channels, window.height, window.width):
            raise ValueError(f"scores of shape {scores.shape} for window {window}")
        self._reserve(window.row_end - self.top)
        w = self.grid.weights(window)
        rows = slice(window.row_off - self.top, window.row_end - self.top)
        cols = slice(window.col_off, window.col_end)
        self._acc[:, rows, cols] += scores * w
        self._wsum[rows, cols] += w

    def _reserve(self, rows: int) -> None:
        """Grow the buffers when a caller adds tiles of a new tile row before popping the last."""
        if rows > self._acc.shape[1]:
            extra = rows - self._acc.shape[1]
            self._acc = np.concatenate([self._acc, np.zeros((self.channels, extra, self.grid.width), np.float32)], 1)
            self._wsum = np.concatenate([self._wsum, np.zeros((extra, self.grid.width), np.float32)], 0)

    def skip(self, window: Window) -> None:
        self._expect(window)

    def pop_finished(self) -> Iterator[tuple[int, np.ndarray]]:
        limit = self._tiles[self._next].row_off if self._next < len(self._tiles) else self.grid.height
        k = limit - self.top
        if k <= 0:
            return
        wsum = self._wsum[:k]
        band = np.divide(self._acc[:, :k], wsum, out=np.zeros_like(self._acc[:, :k]), where=wsum > 0)
        rest = self._acc.shape[1] - k
        self._acc[:, :rest] = self._acc[:, k:].copy()
        self._wsum[:rest] = self._wsum[k:].copy()
        self._acc[:, rest:] = 0
        self._wsum[rest:] = 0
        start, self.top = self.top, limit
        yield start, band


def stream_tiles(grid: TileGrid, read: Callable[[Window], tuple[np.ndarray, np.ndarray]],
                 predict: Callable[[np.ndarray], np.ndarray], channels: int, batch_size: int,
                 fill: np.ndarray, on_tile: Callable[[Window], None] | None = None,
                 ) -> Iterator[tuple[int, np.ndarray]]:
    """Run `predict` over every tile in batches and yield finished (row_off, scores band)s.

    `read(window)` gives (bands, h, w) float32 and a validity mask; invalid pixels are replaced by
    `fill` (bands, 1, 1) before prediction, and tiles without a valid pixel are not predicted.
    `predict` maps (n, bands, h, w) to (n, channels, h, w). Memory: one batch of tiles plus the
    stitcher's one tile height of the image (see the module docstring).
    """
    stitcher = StreamingStitcher(grid, channels)
    pending: list[tuple[Window, np.ndarray | None]] = []

    def flush() -> Iterator[tuple[int, np.ndarray]]:
        batch = [data for _, data in pending if data is not None]
        scores = iter(predict(np.stack(batch)) if batch else [])
        for window, data in pending:
            if data is None:
                stitcher.skip(window)
            else:
                stitcher.add(window, next(scores))
            if on_tile is not None:
                on_tile(window)
            yield from stitcher.pop_finished()
        pending.clear()

    for window in grid:
        data, valid = read(window)
        if not valid.any():
            pending.append((window, None))
        else:
            pending.append((window, np.where(valid, data, fill).astype(np.float32, copy=False)))
        if sum(d is not None for _, d in pending) >= batch_size:
            yield from flush()
    yield from flush()
