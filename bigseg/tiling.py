"""Tile grid, blend window and the streaming stitcher. Knows arrays and windows, never models.

Geometry: along each axis n = ceil((L - overlap) / (tile - overlap)) tiles are spread evenly from
0 to L - tile (no padding, no tile hanging over the edge), so every overlap lies between `overlap`
and overlap + (tile - overlap) / (n - 1); an image smaller than the tile is one tile of its size.

Blend window: along each tile edge that lies inside the image, with `ov` the actual overlap with
the neighbour there, the weight is 0 over the outer ov/4, rises as sin^2 over the middle ov/2 and
is 1 beyond; along image borders it is 1. Neighbours' weights therefore sum to exactly 1, and no
pixel takes weight from a tile in which it lies within overlap/4 of a cut: a model whose receptive
field reaches at most overlap/4 pixels stitches to exactly the whole-image result.

Streaming: each axis is cut at every tile edge into "atoms"; an atom is final as soon as the last
tile covering it (in row-major order) has been added, and is handed out and freed at once. Only
the band where one tile row overlaps the next is held across the full width, so the stitcher holds
at most about
    (channels + 1) * 4 bytes * (max_overlap * width + 4 * tile * tile)
whatever the image height; no full-width band of tile height ever exists.

Arrays: the stitcher blends whatever arrays `predict` returns through a small array namespace
(`NumpyArrays` here; the predictor passes one of torch tensors on its device), so scores can stay
on the GPU and only finished labels travel back to the host.
"""
from __future__ import annotations

import math
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterator

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

    @property
    def row_starts(self) -> list[int]:
        return axis_starts(self.height, self.tile, self.overlap)

    @property
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


class NumpyArrays:
    """The array operations the stitcher needs, on numpy arrays. Another namespace (the
    predictor's, for torch tensors on a GPU) offers the same methods; `+=`, `*`, comparisons and
    slicing are used as is."""

    def zeros(self, shape: tuple[int, ...]) -> np.ndarray:
        return np.zeros(shape, np.float32)

    def weights(self, wy: np.ndarray, wx: np.ndarray) -> np.ndarray:
        """The (h, w) blend window from its two 1-D profiles."""
        return np.outer(wy, wx)

    def accumulate(self, acc: np.ndarray, wsum: np.ndarray, scores: np.ndarray, w: np.ndarray) -> None:
        """acc += scores * w (w broadcast over channels), wsum += w, in place."""
        acc += scores * w
        wsum += w

    def mean(self, acc: np.ndarray, wsum: np.ndarray) -> np.ndarray:
        """acc / wsum where wsum > 0, else 0 (acc is 0 there too); may reuse acc's memory."""
        return np.divide(acc, wsum, out=acc, where=wsum > 0)

    def labels(self, scores: np.ndarray) -> np.ndarray:
        """(C, h, w) -> (h, w) index of the largest score, the first on ties."""
        return scores.argmax(0).astype(np.uint8)


NUMPY = NumpyArrays()


class _Axis:
    """One axis cut at every tile edge: atom a spans [cuts[a], cuts[a + 1]); `last[a]` is the
    index of the last tile covering it, `span[k]` the atoms tile k covers."""

    def __init__(self, starts: list[int], size: int, length: int):
        self.cuts = sorted({0, length, *starts, *(s + size for s in starts)})
        atoms = range(len(self.cuts) - 1)
        self.last = [max(k for k, s in enumerate(starts) if s <= self.cuts[a] and self.cuts[a + 1] <= s + size)
                     for a in atoms]
        self.span = [[a for a in atoms if s <= self.cuts[a] and self.cuts[a + 1] <= s + size] for s in starts]


class StreamingStitcher:
    """Blend per-tile scores (C, h, w) and hand out finished rectangles as soon as they are final.

    Feed every tile of `grid` in order through `add` (scores) or `skip` (nothing to blend, e.g. a
    tile that is all nodata); after each call, `pop_finished` yields (window, block): block of shape
    (C, h, w) holding the weighted mean scores (0 where no tile gave weight). Together the windows
    cover the image exactly once.
    """

    def __init__(self, grid: TileGrid, channels: int, seams: bool = False, track_valid: bool = False,
                 arrays=NUMPY):
        self.grid = grid
        self.channels = channels
        self.arrays = arrays
        # with track_valid, `add` takes the tile's validity mask and `pop_finished` yields
        # (window, block, valid): writers need no second read of the input
        self.track_valid = track_valid
        self._valid: dict[tuple[int, int], np.ndarray] = {}
        # seam report: where two tiles both give weight to a pixel, do their argmax labels agree?
        self.seams = seams
        self.seam_compared = self.seam_disagreed = 0
        self._labels: dict[tuple[int, int], np.ndarray] = {}
        th, tw = grid.tile_shape
        self._rows = _Axis(grid.row_starts, th, grid.height)
        self._cols = _Axis(grid.col_starts, tw, grid.width)
        self._order = [(i, j) for i in range(len(grid.row_starts)) for j in range(len(grid.col_starts))]
        self._next = 0
        self._atoms: dict[tuple[int, int], tuple[np.ndarray, np.ndarray]] = {}
        self._ready: list[tuple[int, int]] = []
        self.peak_pixels = 0  # largest number of pixels held at once (for tests and benchmarks)

    @property
    def done(self) -> bool:
        return self._next >= len(self._order) and not self._ready

    @property
    def held_pixels(self) -> int:
        return sum(w.shape[0] * w.shape[1] for _, w in self._atoms.values())

    def _window(self, a: int, b: int) -> Window:
        r, c = self._rows.cuts, self._cols.cuts
        return Window(c[b], r[a], c[b + 1] - c[b], r[a + 1] - r[a])

    def _advance(self, window: Window) -> tuple[int, int]:
        if self._next >= len(self._order):
            raise ValueError(f"tiles must arrive in grid order: got {window} after the last tile")
        i, j = self._order[self._next]
        th, tw = self.grid.tile_shape
        expected = Window(self.grid.col_starts[j], self.grid.row_starts[i], tw, th)
        if window != expected:
            raise ValueError(f"tiles must arrive in grid order: got {window}, expected {expected}")
        self._next += 1
        self._ready += [(a, b) for a in self._rows.span[i] if self._rows.last[a] == i
                        for b in self._cols.span[j] if self._cols.last[b] == j]
        return i, j

    def add(self, window: Window, scores: np.ndarray, valid: np.ndarray | None = None) -> None:
        if scores.shape != (self.channels, window.height, window.width):
            raise ValueError(f"scores of shape {scores.shape} for window {window}")
        i, j = self._advance(window)
        weights = self.arrays.weights(*self.grid.profiles(window))
        for a in self._rows.span[i]:
            for b in self._cols.span[j]:
                atom = self._window(a, b)
                ys = slice(atom.row_off - window.row_off, atom.row_end - window.row_off)
                xs = slice(atom.col_off - window.col_off, atom.col_end - window.col_off)
                if (a, b) not in self._atoms:
                    self._atoms[(a, b)] = (self.arrays.zeros((self.channels, atom.height, atom.width)),
                                           self.arrays.zeros((atom.height, atom.width)))
                acc, wsum = self._atoms[(a, b)]
                if self.track_valid:
                    if (a, b) not in self._valid:
                        self._valid[(a, b)] = valid[ys, xs].copy()
                w = weights[ys, xs]
                if self.seams:
                    self._compare(a, b, scores[:, ys, xs], w, wsum)
                self.arrays.accumulate(acc, wsum, scores[:, ys, xs], w)
        self.peak_pixels = max(self.peak_pixels, self.held_pixels)

    def _compare(self, a: int, b: int, scores: np.ndarray, w: np.ndarray, wsum: np.ndarray) -> None:
        used = w > 0
        if not used.any():
            return
        labels = self.arrays.labels(scores)
        first = self._labels.get((a, b))
        if first is None:
            self._labels[(a, b)] = labels
            return
        both = used & (wsum > 0)
        self.seam_compared += int(both.sum())
        self.seam_disagreed += int((both & (labels != first)).sum())
        fresh = used & (wsum == 0)
        first[fresh] = labels[fresh]

    def skip(self, window: Window) -> None:
        self._advance(window)

    def pop_finished(self) -> Iterator[tuple[Window, np.ndarray]]:
        ready, self._ready = self._ready, []
        for a, b in ready:
            atom = self._window(a, b)
            if (a, b) not in self._atoms:
                block = self.arrays.zeros((self.channels, atom.height, atom.width))
                valid = np.zeros((atom.height, atom.width), bool)
            else:
                acc, wsum = self._atoms.pop((a, b))
                self._labels.pop((a, b), None)
                block = self.arrays.mean(acc, wsum)
                valid = self._valid.pop((a, b), None)
            yield (atom, block, valid) if self.track_valid else (atom, block)


def stitcher_peak_pixels(grid: TileGrid) -> int:
    """The largest area `StreamingStitcher` holds at once on `grid`, from its bookkeeping alone
    (every tile predicted, none skipped: the worst case)."""
    th, tw = grid.tile_shape
    rows = _Axis(grid.row_starts, th, grid.height)
    cols = _Axis(grid.col_starts, tw, grid.width)
    area = lambda a, b: (rows.cuts[a + 1] - rows.cuts[a]) * (cols.cuts[b + 1] - cols.cuts[b])  # noqa: E731
    live: set[tuple[int, int]] = set()
    held = peak = 0
    for i in range(len(grid.row_starts)):
        for j in range(len(grid.col_starts)):
            for a in rows.span[i]:
                for b in cols.span[j]:
                    if (a, b) not in live:
                        live.add((a, b))
                        held += area(a, b)
            peak = max(peak, held)
            for a in rows.span[i]:
                if rows.last[a] != i:
                    continue
                for b in cols.span[j]:
                    if cols.last[b] == j and (a, b) in live:
                        live.discard((a, b))
                        held -= area(a, b)
    return peak


def stream_tiles(grid: TileGrid, read: Callable[[Window], tuple[np.ndarray, np.ndarray]],
                 predict: Callable[[np.ndarray], Any], channels: int, batch_size: int,
                 fill: np.ndarray, on_tile: Callable[[Window], None] | None = None,
                 done_rows: int = 0, seams: dict | None = None, stop_rows: int | None = None,
                 with_valid: bool = False, prefetch: int = 0, arrays=NUMPY,
                 finish: Callable[..., Any] | None = None, lookahead: int = 0) -> Iterator[Any]:
    """Run `predict` over every tile in batches and yield finished (window, scores) rectangles.

    `read(window)` gives (bands, h, w) float32 and a validity mask; invalid pixels are replaced by
    `fill` (bands, 1, 1) before prediction, and tiles without a valid pixel are not predicted.
    `predict` maps (n, bands, h, w) to (n, channels, h, w) scores, arrays of `arrays`' kind (numpy
    by default). Memory: one batch of tiles plus the stitcher's overlap band (see the module
    docstring). `done_rows`: the rows above are already final (a resumed job); tiles entirely
    inside them are neither read nor predicted, and the rectangles yielded there are meaningless
    (the caller drops them). `stop_rows`: stop once every row above it is final (tiles starting at
    or below it are not run; one part of a distributed job). `with_valid`: yield (window, scores,
    valid), the input's validity carried through the stitcher. `prefetch`: read up to this many
    batches ahead in a background thread (GDAL and the decoders release the GIL, so reading
    overlaps inference; `read` must be thread-safe with respect to the caller's own reads).
    `seams`: a dict that receives `compared` and `disagreed`, the overlap pixels two tiles both
    weighted and those whose argmax labels differ (the seam report).

    Asynchronous devices: `finish(*item)` maps each finished item as soon as it is stitched (e.g.
    labels computed and their copy to the host started), and the mapped item is yielded instead.
    With `lookahead` 1 the next batch is handed to `predict` before the finished items of the
    previous one are yielded, so a GPU computes batch k + 1 while the caller writes the results
    of batch k; the order of what is yielded does not change.
    """
    stitcher = StreamingStitcher(grid, channels, seams=seams is not None, track_valid=with_valid,
                                 arrays=arrays)

    def stitch(group: list[tuple[Window, Any, Any]], scores: Any) -> list:
        done = []
        scores = iter(scores)
        for window, data, valid in group:
            if data is None:
                stitcher.skip(window)
            else:
                stitcher.add(window, next(scores), valid)
            if on_tile is not None:
                on_tile(window)
            done += [item if finish is None else finish(*item) for item in stitcher.pop_finished()]
        return done

    def submit(group: list[tuple[Window, Any, Any]]) -> Any:
        batch = [data for _, data, _ in group if data is not None]
        return predict(np.stack(batch)) if batch else []

    def load(window: Window):
        if window.row_end <= done_rows:
            return None, None
        data, valid = read(window)
        if not valid.any():
            return None, None
        return np.where(valid, data, fill).astype(np.float32, copy=False), valid

    windows = [w for w in grid if stop_rows is None or w.row_off < stop_rows]
    in_flight: list[tuple[list, Any]] = []  # submitted batches not yet stitched, oldest first
    with ExitStack() as stack:
        source = ((w, load(w)) for w in windows) if prefetch <= 0 else \
            stack.enter_context(_read_ahead(windows, load, prefetch * batch_size))
        group: list[tuple[Window, Any, Any]] = []
        for window, (data, valid) in source:
            group.append((window, data, valid))
            if sum(d is not None for _, d, _ in group) < batch_size:
                continue
            done = stitch(*in_flight.pop(0)) if len(in_flight) >= max(1, lookahead) else []
            in_flight.append((group, submit(group)))
            group = []
            if lookahead <= 0:
                done += stitch(*in_flight.pop(0))
            yield from done
        if group:
            in_flight.append((group, submit(group)))
        while in_flight:
            yield from stitch(*in_flight.pop(0))
    if seams is not None:
        seams.update(compared=stitcher.seam_compared, disagreed=stitcher.seam_disagreed)


@contextmanager
def _read_ahead(windows: list[Window], load: Callable, ahead: int):
    """(window, load(window)) in order, loading up to `ahead` windows ahead in a background thread."""
    from concurrent.futures import ThreadPoolExecutor

    pool = ThreadPoolExecutor(1, thread_name_prefix="bigseg-read")
    futures = [pool.submit(load, w) for w in windows[:ahead]]

    def tiles():
        for k, window in enumerate(windows):
            if k + ahead < len(windows):
                futures.append(pool.submit(load, windows[k + ahead]))
            yield window, futures[k].result()
            futures[k] = None  # release the tile's arrays

    try:
        yield tiles()
    finally:
        for f in futures:
            if f is not None:
                f.cancel()
        pool.shutdown(wait=True)
