"""Tile geometry: tiles in bounds, spread evenly, blend weights summing to one, the stitcher's
peak simulated exactly."""

import numpy as np
from hypothesis import example, given, settings
from hypothesis import strategies as st

from bigseg.tiling.geometry import (
    TileGrid,
    edge_profile,
    stitcher_peak_pixels,
)
from bigseg.tiling.stitch import StreamingStitcher


@settings(max_examples=60, deadline=None)
@given(w=st.integers(1, 700), h=st.integers(1, 700), tile=st.integers(16, 300), frac=st.floats(0, 0.9))
def test_tiles_stay_in_bounds_and_every_pixel_gets_weight(w, h, tile, frac):
    grid = TileGrid(w, h, tile, int(tile * frac))
    total = np.zeros((h, w))
    for win in grid:
        assert 0 <= win.col_off and win.col_end <= w and 0 <= win.row_off and win.row_end <= h
        assert (win.height, win.width) == grid.tile_shape
        total[win.slices] += grid.weights(win)
    assert total.min() > 0


@settings(max_examples=40, deadline=None)
@given(w=st.integers(1, 3000), tile=st.integers(16, 400), frac=st.floats(0, 0.49))
@example(w=58, tile=36, frac=0.4375)  # three tiles over one pixel (found by a full run here)
def test_tiles_are_spread_evenly_and_neighbour_weights_sum_to_one(w, tile, frac):
    grid = TileGrid(w, 1, tile, int(tile * frac))
    starts = grid.col_starts
    assert starts[0] == 0 and starts[-1] + grid.tile_shape[1] == w  # no padding, nothing hangs over
    gaps = np.diff(starts)
    assert len(gaps) == 0 or gaps.max() - gaps.min() <= 1
    assert grid.max_overlap >= grid.overlap or len(starts) == 1
    total, cover = np.zeros(w), np.zeros(w, int)
    for win in grid:
        total[win.col_off:win.col_end] += grid.weights(win)[0]
        cover[win.col_off:win.col_end] += 1
    # two neighbours' ramps are mirror images: they sum to one; where a narrow image packs three
    # tiles over a pixel (e.g. w=58, tile 36) a tile's two ramps meet (sum 1 - 1.2e-4) and the
    # stitcher's division by the weight sum does the normalising, so the sum need only stay far from 0
    assert np.allclose(total[cover <= 2], 1.0, atol=1e-5)
    assert (total > 0.5).all()


def test_blend_weight_is_zero_near_cuts_and_one_at_image_borders():
    p = edge_profile(256, 64, 64)
    assert (p[:16] == 0).all() and (p[-16:] == 0).all() and (p[48:-48] == 1).all()
    assert np.all(np.diff(p[16:48]) > 0)  # smooth rise, no hard cut line
    assert (edge_profile(256, 0, 0) == 1).all()


def test_stitcher_peak_is_simulated_exactly():
    for w, h, t, o in ((1000, 700, 256, 64), (300, 90, 64, 16), (2000, 2000, 512, 128)):
        grid = TileGrid(w, h, t, o)
        s = StreamingStitcher(grid, 1)
        for win in grid:
            s.add(win, np.zeros((1, win.height, win.width), np.float32))
            list(s.pop_finished())
        assert s.peak_pixels == stitcher_peak_pixels(grid)
