"""The streaming stitcher and `stream_tiles(grid, read, pipeline)`: tiles read, predicted in
batches, blended, and handed out as finished rectangles. Knows arrays and windows, never models.

Streaming: each axis is cut at every tile edge into atoms (`bigseg.tiling.geometry`); an atom is final
as soon as the last tile covering it (in row-major order) has been added, and is handed out and
freed at once. Only the band where one tile row overlaps the next is held across the full width,
so the stitcher holds at most about
    (channels + 1) * 4 bytes * (max_overlap * width + 4 * tile * tile)
whatever the image height; no full-width band of tile height ever exists.

Arrays: the stitcher blends whatever arrays `predict` returns through a small array namespace
(`NumpyArrays` here; the predictor passes one of torch tensors on its device), so scores can stay
on the GPU and only finished labels travel back to the host.
"""
from __future__ import annotations

import itertools
from collections import deque
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator

import numpy as np

from bigseg.tiling.geometry import AtomAxis, TileGrid, Window

PREFETCH_BATCHES = 2  # batches read ahead in a background thread while the model runs


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

    def probabilities(self, block: np.ndarray, averaged: bool) -> np.ndarray:
        """uint8 probabilities p x 255 of a finished rectangle's logits (or averaged probabilities)."""
        if averaged:
            p = block / np.maximum(block.sum(0, keepdims=True), 1e-12)
        else:
            e = np.exp(block - block.max(0, keepdims=True))
            p = e / e.sum(0, keepdims=True)
        return np.round(p * 255).astype(np.uint8)

    def host(self, arrays: dict[str, np.ndarray]) -> "OnHost":
        """Finished arrays as the writers take them (`numpy()`), already on the host."""
        return OnHost(arrays)

    def numpy(self, x: np.ndarray) -> np.ndarray:
        return x

    def from_numpy(self, x: np.ndarray) -> np.ndarray:
        return x

    def concatenate(self, parts: list[np.ndarray]) -> np.ndarray:
        return np.concatenate(parts)


class OnHost(dict):
    """Finished arrays already on the host (what a device's copy to the host gives, without one)."""

    def numpy(self) -> dict[str, np.ndarray]:
        return self


NUMPY = NumpyArrays()


class StreamingStitcher:
    """Blend per-tile scores (C, h, w) and hand out finished rectangles as soon as they are final.

    Feed every tile of `grid` in order through `add` (scores) or `skip` (nothing to blend, e.g. a
    tile that is all nodata); after each call, `pop_finished` yields (window, block): block of shape
    (C, h, w) holding the weighted mean scores (0 where no tile gave weight), or None where no tile
    was added at all (nothing was allocated there: a nodata region costs no memory). Together the
    windows cover the image exactly once.
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
        self._rows = AtomAxis(grid.row_starts, th, grid.height)
        self._cols = AtomAxis(grid.col_starts, tw, grid.width)
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

    def pop_finished(self) -> Iterator[tuple[Window, np.ndarray | None]]:
        ready, self._ready = self._ready, []
        for a, b in ready:
            atom = self._window(a, b)
            if (a, b) not in self._atoms:
                block, valid = None, None
            else:
                acc, wsum = self._atoms.pop((a, b))
                self._labels.pop((a, b), None)
                block = self.arrays.mean(acc, wsum)
                valid = self._valid.pop((a, b), None)
            yield (atom, block, valid) if self.track_valid else (atom, block)


@dataclass(frozen=True)
class Pipeline:
    """How tiles become scores. `predict` maps (n, bands, h, w) float32 to (n, channels, h, w)
    scores, arrays of `arrays`' kind; invalid pixels are replaced by `fill` (bands, 1, 1) first.
    `finish(window, block, valid)` maps each finished rectangle as soon as it is stitched (e.g.
    labels computed on the device and their copy to the host started); with `lookahead` 1 the next
    batch is handed to `predict` before the previous one's results are yielded, so a GPU computes
    batch k + 1 while the caller writes batch k. `prefetch`: batches read ahead in a background
    thread (GDAL and the decoders release the GIL, so reading overlaps inference)."""

    predict: Callable[[np.ndarray], Any]
    channels: int
    fill: np.ndarray
    batch_size: int = 1
    arrays: Any = NUMPY
    finish: Callable[..., Any] | None = None
    lookahead: int = 0
    prefetch: int = 0


def stream_tiles(grid: TileGrid, read: Callable[[Window], tuple[np.ndarray, np.ndarray]], pipeline: Pipeline,
                 rows: tuple[int, int] | None = None, on_tile: Callable[[Window], None] | None = None,
                 seams: dict | None = None) -> Iterator[Any]:
    """Predict every tile of `grid` in batches and yield the finished rectangles, each as
    (window, scores, valid) (mapped by `pipeline.finish`), in an order that covers the image
    (or `rows`) exactly once.

    `read(window)` gives (bands, h, w) float32 and a validity mask, or None for a window known to
    hold no valid pixel; tiles without a valid pixel are not predicted, and rectangles no tile
    was predicted for come out as (window, None, None), not mapped by `finish`. `rows` = (top, bottom): yield
    only rectangles in those rows; tiles entirely above `top` are neither read nor predicted (a
    resumed job, or one part of a distributed one) and tiles starting at or below `bottom` are not
    run. `read` must be thread-safe with respect to the caller's own reads when prefetching.
    `seams`: a dict that receives `compared` and `disagreed`, the overlap pixels two tiles both
    weighted and those whose argmax labels differ (the seam report). Memory: one batch of tiles
    plus the stitcher's overlap band (see the module docstring).
    """
    stream = _Stream(grid, pipeline, rows or (0, grid.height), on_tile, seams is not None)
    yield from stream.run(read)
    if seams is not None:
        seams.update(compared=stream.stitcher.seam_compared, disagreed=stream.stitcher.seam_disagreed)


class _Stream:
    """One run of `stream_tiles`: the stitcher, the batch being gathered and the batches in flight."""

    def __init__(self, grid: TileGrid, pipeline: Pipeline, rows: tuple[int, int],
                 on_tile: Callable[[Window], None] | None, seams: bool):
        self.grid, self.p, (self.top, self.bottom), self.on_tile = grid, pipeline, rows, on_tile
        self.stitcher = StreamingStitcher(grid, pipeline.channels, seams=seams, track_valid=True,
                                          arrays=pipeline.arrays)

    def load(self, read: Callable, window: Window) -> tuple[Any, Any]:
        """A tile's data with invalid pixels filled, and its validity; (None, None) when there is
        nothing to predict (above `top`, known empty, or no valid pixel)."""
        if window.row_end <= self.top:
            return None, None
        got = read(window)
        if got is None:  # known to hold no valid pixel without reading it
            return None, None
        data, valid = got
        if not valid.any():
            return None, None
        return np.where(valid, data, self.p.fill).astype(np.float32, copy=False), valid

    def submit(self, group: list[tuple[Window, Any, Any]]) -> Any:
        batch = [data for _, data, _ in group if data is not None]
        return self.p.predict(np.stack(batch)) if batch else []

    def stitch(self, group: list[tuple[Window, Any, Any]], scores: Any) -> list:
        """Add a batch's tiles in grid order; the finished rectangles in `rows`, mapped by `finish`."""
        done, scores, finish = [], iter(scores), self.p.finish
        for window, data, valid in group:
            if data is None:
                self.stitcher.skip(window)
            else:
                self.stitcher.add(window, next(scores), valid)
            if self.on_tile is not None:
                self.on_tile(window)
            done += [item if finish is None or item[1] is None else finish(*item) for item in self.stitcher.pop_finished()
                     if item[0].row_end > self.top and item[0].row_off < self.bottom]
        return done

    def run(self, read: Callable) -> Iterator[Any]:
        p = self.p
        windows = itertools.takewhile(lambda w: w.row_off < self.bottom, self.grid)  # row-major: lazily
        in_flight: list[tuple[list, Any]] = []  # submitted batches not yet stitched, oldest first
        with ExitStack() as stack:
            load = lambda window: self.load(read, window)
            source = ((w, load(w)) for w in windows) if p.prefetch <= 0 else \
                stack.enter_context(_read_ahead(windows, load, p.prefetch * p.batch_size))
            group: list[tuple[Window, Any, Any]] = []
            filled = 0  # tiles to predict in `group`
            for window, (data, valid) in source:
                if data is None and not filled:
                    # nothing waits for a batch: a nodata tile is stitched (and its rectangles handed
                    # out) at once, so a long run of them holds no memory and the writer keeps moving
                    done = [item for batch in in_flight for item in self.stitch(*batch)]
                    in_flight, group = [], group + [(window, None, None)]
                    yield from done + self.stitch(group, [])
                    group = []
                    continue
                group.append((window, data, valid))
                filled += data is not None
                if filled < p.batch_size:
                    continue
                done = self.stitch(*in_flight.pop(0)) if len(in_flight) >= max(1, p.lookahead) else []
                in_flight.append((group, self.submit(group)))
                group, filled = [], 0
                if p.lookahead <= 0:
                    done += self.stitch(*in_flight.pop(0))
                yield from done
            if group:
                in_flight.append((group, self.submit(group)))
            while in_flight:
                yield from self.stitch(*in_flight.pop(0))


@contextmanager
def _read_ahead(windows: Iterable[Window], load: Callable, ahead: int):
    """(window, load(window)) in order, loading up to `ahead` windows ahead in a background thread."""
    from concurrent.futures import ThreadPoolExecutor

    pool = ThreadPoolExecutor(1, thread_name_prefix="bigseg-read")
    windows = iter(windows)
    pending = deque((w, pool.submit(load, w)) for w in itertools.islice(windows, ahead))

    def tiles():
        while pending:
            window, future = pending.popleft()  # the tile's arrays are released once handed on
            following = next(windows, None)
            if following is not None:
                pending.append((following, pool.submit(load, following)))
            yield window, future.result()

    try:
        yield tiles()
    finally:
        for _, future in pending:
            future.cancel()
        pool.shutdown(wait=True)
