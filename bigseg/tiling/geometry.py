"""Tile geometry as values: windows, the tile grid, the blend window and the default overlap
rule. Pure numpy; the tiling engine (`bigseg.tiling.stitch`) and every reader and writer build on it.

Grid: along each axis n = ceil((L - overlap) / (tile - overlap)) tiles are spread evenly from
0 to L - tile (no padding, no tile hanging over the edge), so every overlap lies between `overlap`
and overlap + (tile - overlap) / (n - 1); an image smaller than the tile is one tile of its size.

Blend window: along each tile edge that lies inside the image, with `ov` the actual overlap with
the neighbour there, the weight is 0 over the outer ov/4, rises as sin^2 over the middle ov/2 and
is 1 beyond; along image borders it is 1. Neighbours' weights therefore sum to exactly 1, and no
pixel takes weight from a tile in which it lies within overlap/4 of a cut: a model whose receptive
field reaches at most overlap/4 pixels stitches to exactly the whole-image result.

Atoms: each axis cut at every tile edge; an atom is final once the last tile covering it is done
(the streaming stitcher frees it then). `stitcher_peak_pixels` computes what that bookkeeping
holds at its peak.

Default overlap: a pixel that is used always has at least overlap/4 of context, so the overlap
is 4 x the model's context margin, rounded up to a multiple of 16 and capped at half the tile;
tile/4 for models that see the whole tile.
"""
from __future__ import annotations

import bisect
import math
from dataclasses import dataclass
from functools import cached_property
from typing import Any, Iterator

import numpy as np

from bigseg.errors import InputError


@dataclass
class Georef:
    """Where a pixel grid is on Earth: CRS and affine transform, or ground control points (the one
    georeference type: readers give it, writers keep it, areas and polygons measure with it)."""

    crs: Any = None
    transform: Any = None
    gcps: list | None = None
    gcps_crs: Any = None

    @property
    def mapped(self) -> bool:
        """A CRS and an affine transform: positions and areas on the ground can be computed."""
        return self.crs is not None and self.transform is not None and not self.gcps

    @classmethod
    def of(cls, ds: Any) -> Georef:
        """The georeference of an open rasterio data set."""
        gcps, gcps_crs = ds.gcps if ds.gcps[0] else (None, None)
        return cls(ds.crs, ds.transform, gcps, gcps_crs)


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


def axis_starts(length: int, tile: int, overlap: int) -> list[int]:
    """Tile offsets along one axis: evenly spread, first at 0, last ending at `length`."""
    if length <= tile:
        return [0]
    n = math.ceil((length - overlap) / (tile - overlap))
    return [round(k * (length - tile) / (n - 1)) for k in range(n)]


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
    def tile_shape(self) -> tuple[int, int]:
        return min(self.tile, self.height), min(self.tile, self.width)

    @cached_property
    def row_starts(self) -> list[int]:
        return axis_starts(self.height, self.tile, self.overlap)

    @cached_property
    def col_starts(self) -> list[int]:
        return axis_starts(self.width, self.tile, self.overlap)

    @property
    def max_overlap(self) -> int:
        """The largest overlap between neighbouring tiles (rows or columns)."""
        th, tw = self.tile_shape
        gaps = [(b - a, t) for starts, t in ((self.row_starts, th), (self.col_starts, tw))
                for a, b in zip(starts, starts[1:])]
        return max((t - g for g, t in gaps), default=0)

    def __len__(self) -> int:
        return len(self.row_starts) * len(self.col_starts)

    def __iter__(self) -> Iterator[Window]:
        th, tw = self.tile_shape
        for r in self.row_starts:
            for c in self.col_starts:
                yield Window(c, r, tw, th)

    def profiles(self, window: Window) -> tuple[np.ndarray, np.ndarray]:
        """The blend window of one tile as its row and column profiles: weights = outer(wy, wx)."""
        th, tw = self.tile_shape
        return (_axis_profile(self.row_starts, window.row_off, th),
                _axis_profile(self.col_starts, window.col_off, tw))

    def weights(self, window: Window) -> np.ndarray:
        """The blend window of one tile, shape (height, width), float32."""
        return np.outer(*self.profiles(window))


def _axis_profile(starts: list[int], start: int, size: int) -> np.ndarray:
    k = starts.index(start)
    before = starts[k - 1] + size - start if k > 0 else 0
    after = start + size - starts[k + 1] if k + 1 < len(starts) else 0
    return edge_profile(size, before, after)


def edge_profile(length: int, overlap_start: int, overlap_end: int) -> np.ndarray:
    """1-D blend weights: at each end with overlap ov > 0, zero over ov/4, sin^2 rise over ov/2, then 1."""
    w = np.ones(length, np.float32)
    for ov, at_start in ((overlap_start, True), (overlap_end, False)):
        dead = ov // 4
        ramp = ov - 2 * dead
        if ov <= 0 or ramp <= 0:
            continue
        rise = np.sin(0.5 * math.pi * (np.arange(ramp) + 0.5) / ramp) ** 2
        profile = np.concatenate([np.zeros(dead), rise]).astype(np.float32)[:length]
        if at_start:
            w[:len(profile)] *= profile
        else:
            w[length - len(profile):] *= profile[::-1]
    return w


class AtomAxis:
    """One axis cut at every tile edge: atom a spans [cuts[a], cuts[a + 1]); `first[a]` and
    `last[a]` are the indices of the first and last tile covering it, `span[k]` the atoms tile k
    covers (a contiguous run)."""

    def __init__(self, starts: list[int], size: int, length: int):
        self.cuts = sorted({0, length, *starts, *(s + size for s in starts)})
        index = {cut: a for a, cut in enumerate(self.cuts)}
        atoms = range(len(self.cuts) - 1)
        # tile k covers atom a when starts[k] <= cuts[a] and cuts[a + 1] <= starts[k] + size; starts ascend
        self.first = [bisect.bisect_left(starts, self.cuts[a + 1] - size) for a in atoms]
        self.last = [bisect.bisect_right(starts, self.cuts[a]) - 1 for a in atoms]
        self.span = [list(range(index[s], index[s + size])) for s in starts]

    @property
    def sizes(self) -> np.ndarray:
        return np.diff(np.asarray(self.cuts, np.int64))


def stitcher_peak_pixels(grid: TileGrid) -> int:
    """The largest area `StreamingStitcher` holds at once on `grid` (every tile predicted, none
    skipped: the worst case), from its bookkeeping: atom (a, b) is held from the first tile that
    covers it to the last, in row-major order, so while tile (i, j) is added a row atom that spans
    tile row i holds all its column atoms, one that starts there those first covered by column j
    or earlier, one that ends there those last covered by column j or later, one that starts and
    ends there those covered by column j. Exact, and linear in the number of tiles."""
    th, tw = grid.tile_shape
    rows = AtomAxis(grid.row_starts, th, grid.height)
    cols = AtomAxis(grid.col_starts, tw, grid.width)
    nr, nc = len(grid.row_starts), len(grid.col_starts)
    widths, heights = cols.sizes, rows.sizes
    width = int(widths.sum())
    opened = np.cumsum(np.bincount(cols.first, widths, nc))               # first covered by column <= j
    closed_before = np.concatenate([[0], np.cumsum(np.bincount(cols.last, widths, nc))[:-1]])
    still_open = width - closed_before                                     # last covered by column >= j
    covered = opened - closed_before                                       # first <= j <= last
    through, starts, ends, inside = (np.zeros(nr + 1, np.int64) for _ in range(4))
    for h, first, last in zip(heights, rows.first, rows.last):
        if first == last:
            inside[first] += h
        else:
            starts[first] += h
            ends[last] += h
            through[first + 1] += h
            through[last] -= h
    through = np.cumsum(through)
    peak = 0
    for i in range(nr):
        held = through[i] * width + starts[i] * opened + ends[i] * still_open + inside[i] * covered
        peak = max(peak, int(held.max()))
    return peak


def default_overlap(margin: int | None, tile: int) -> int:
    """4 x margin rounded up to 16, within [16, tile / 2]; tile / 4 when the margin is unknown."""
    if margin is None:
        return tile // 4
    overlap = -(-4 * margin // 16) * 16
    return max(16, min(overlap, tile // 2))


def choose_overlap(overlap: int | None, margin: int | None, tile: int) -> tuple[int, str]:
    """The overlap and where it comes from: given, from the model's context margin, or tile/4."""
    if overlap is not None:
        chosen, source = overlap, "given"
    elif margin is None:
        chosen, source = default_overlap(None, tile), "tile/4: the model sees the whole tile (global pooling or unbounded context)"
    else:
        chosen, source = default_overlap(margin, tile), f"from the model's context margin {margin} px (4 x margin, at most tile/2)"
    if not 0 <= chosen < tile:
        raise InputError(f"must be in [0, tile), got {chosen} for tile {tile}", param="overlap")
    return chosen, source
