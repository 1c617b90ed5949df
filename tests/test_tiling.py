"""Tiling (`bigseg.tiling`): the grid and blend window as values, and the streaming stitcher:
tiled equals whole-image where the receptive field allows."""
import numpy as np
import pytest
import torch
from hypothesis import example, given, settings, strategies as st

from bigseg.tiling.geometry import TileGrid, edge_profile, stitcher_peak_pixels, Window
from bigseg.tiling.stitch import Pipeline, StreamingStitcher, stream_tiles
from tests.conftest import small_receptive_field_net, tiled_prediction


# --- Tile geometry: tiles in bounds, spread evenly, blend weights summing to one, the stitcher's peak
# simulated exactly.


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


def test_stitcher_peak_is_computed_exactly():
    for w, h, t, o in ((1000, 700, 256, 64), (300, 90, 64, 16), (2000, 2000, 512, 128), (58, 300, 36, 15)):
        grid = TileGrid(w, h, t, o)
        s = StreamingStitcher(grid, 1)
        for win in grid:
            s.add(win, np.zeros((1, win.height, win.width), np.float32))
            list(s.pop_finished())
        assert s.peak_pixels == stitcher_peak_pixels(grid)


def simulated_peak(grid: TileGrid) -> int:
    """The stitcher's bookkeeping played tile by tile: each atom held from the first tile covering
    it until the last (the reference for the closed form)."""
    th, tw = grid.tile_shape
    covering = lambda starts, size, lo, hi: [k for k, s in enumerate(starts) if s <= lo and hi <= s + size]
    axes = []
    for starts, size, length in ((grid.row_starts, th, grid.height), (grid.col_starts, tw, grid.width)):
        cuts = sorted({0, length, *starts, *(s + size for s in starts)})
        axes.append([(cuts[a + 1] - cuts[a], covering(starts, size, cuts[a], cuts[a + 1])) for a in range(len(cuts) - 1)])
    nc = len(grid.col_starts)
    events = np.zeros(len(grid) + 1, np.int64)
    for h, row_tiles in axes[0]:
        for w, col_tiles in axes[1]:
            events[row_tiles[0] * nc + col_tiles[0]] += h * w
            events[row_tiles[-1] * nc + col_tiles[-1] + 1] -= h * w
    return int(np.cumsum(events).max())


@settings(max_examples=60, deadline=None)
@given(w=st.integers(1, 900), h=st.integers(1, 900), tile=st.integers(16, 300), frac=st.floats(0, 0.9))
def test_the_closed_form_peak_equals_the_bookkeeping_played_tile_by_tile(w, h, tile, frac):
    grid = TileGrid(w, h, tile, int(tile * frac))
    assert stitcher_peak_pixels(grid) == simulated_peak(grid)


# --- Tile geometry, blend window and streaming stitcher: exact coverage, exact stitching, bounded memory.


@settings(max_examples=40, deadline=None)
@given(w=st.integers(1, 400), h=st.integers(1, 400), tile=st.integers(16, 128), frac=st.floats(0, 0.75))
def test_identity_model_gives_back_the_input(w, h, tile, frac):
    grid = TileGrid(w, h, tile, int(tile * frac))
    image = np.random.default_rng(0).normal(size=(2, h, w)).astype(np.float32)
    read = lambda win: (image[(slice(None), *win.slices)], np.ones((win.height, win.width), bool))
    out = np.full_like(image, np.nan)
    cover = np.zeros((h, w), int)
    for win, block, _ in stream_tiles(grid, read, Pipeline(lambda x: x, 2, np.zeros((2, 1, 1), np.float32), 3)):
        out[(slice(None), *win.slices)] = block
        cover[win.slices] += 1
    assert (cover == 1).all()  # finished rectangles cover the image exactly once
    np.testing.assert_allclose(out, image, rtol=1e-6, atol=1e-6)


def test_tiled_equals_whole_image_when_receptive_field_fits_in_the_overlap():
    net = small_receptive_field_net()  # receptive radius 4 = the dead zone overlap/4 of 96-px tiles
    image = np.random.default_rng(1).uniform(0, 255, (3, 301, 437)).astype(np.float32)
    predict = lambda x: net(torch.from_numpy(x)).detach().numpy()
    with torch.no_grad():
        whole = predict(image[None])[0]
        tiled = tiled_prediction(predict, image)
    np.testing.assert_allclose(tiled, whole, rtol=1e-4, atol=1e-4)


def test_stitcher_memory_depends_on_width_and_tile_not_height():
    """Held pixels stay under max_overlap * width + 4 * tile^2, for a short and a very tall image."""
    for height in (600, 20000):
        grid = TileGrid(3000, height, 256, 64)
        stitcher = StreamingStitcher(grid, 1)
        emitted = 0
        for win in grid:
            stitcher.add(win, np.ones((1, win.height, win.width), np.float32))
            emitted += sum(w.width * w.height for w, _ in stitcher.pop_finished())
        assert emitted == 3000 * height and stitcher.done and stitcher.held_pixels == 0
        assert stitcher.peak_pixels <= grid.max_overlap * 3000 + 4 * 256 * 256


def test_tiles_out_of_order_are_refused():
    grid = TileGrid(300, 300, 128, 32)
    stitcher = StreamingStitcher(grid, 1)
    with pytest.raises(ValueError, match="grid order"):
        stitcher.add(Window(172, 0, 128, 128), np.zeros((1, 128, 128), np.float32))


def test_all_invalid_tiles_are_not_predicted_and_invalid_pixels_are_filled():
    image = np.full((1, 64, 200), 7.0, np.float32)
    valid = np.zeros((64, 200), bool)
    valid[:, 150:] = True
    seen = []

    def predict(x):
        seen.append(x.copy())
        return x

    read = lambda win: (image[(slice(None), *win.slices)], valid[win.slices])
    list(stream_tiles(TileGrid(200, 64, 64, 16), read, Pipeline(predict, 1, np.full((1, 1, 1), -1, np.float32), 8)))
    batch = np.concatenate(seen)
    assert len(batch) == 2  # tiles at columns 136 and 144 touch valid pixels; the rest are skipped
    assert set(np.unique(batch)) == {-1.0, 7.0}


def test_lookahead_submits_the_next_batch_before_yielding_and_changes_nothing_else():
    grid = TileGrid(300, 200, 64, 16)
    image = np.random.default_rng(2).normal(size=(2, 200, 300)).astype(np.float32)
    read = lambda win: (image[(slice(None), *win.slices)], np.ones((win.height, win.width), bool))
    runs = {}
    for lookahead in (0, 1):
        log = []

        def predict(x):
            log.append(("predict", len(x)))
            return x * 2

        out = []
        for win, block, _ in stream_tiles(grid, read, Pipeline(predict, 2, np.zeros((2, 1, 1), np.float32), 3,
                                                               lookahead=lookahead, prefetch=1)):
            log.append(("yield", win))
            out.append((win, block.copy()))
        runs[lookahead] = (out, log)
    (plain, plain_log), (ahead, ahead_log) = runs[0], runs[1]
    assert [w for w, _ in plain] == [w for w, _ in ahead]
    assert all(np.array_equal(a, b) for (_, a), (_, b) in zip(plain, ahead))
    # with lookahead, between two yields of one batch's results the next batch was already predicted
    first_yield = next(i for i, e in enumerate(ahead_log) if e[0] == "yield")
    assert [e[0] for e in ahead_log[:first_yield]] == ["predict", "predict"]
    assert [e[0] for e in plain_log[:plain_log.index(next(e for e in plain_log if e[0] == "yield"))]] == ["predict"]


def test_finish_maps_each_finished_item_when_it_is_stitched():
    grid = TileGrid(150, 90, 64, 16)
    image = np.ones((1, 90, 150), np.float32)
    read = lambda win: (image[(slice(None), *win.slices)], np.ones((win.height, win.width), bool))
    items = list(stream_tiles(grid, read, Pipeline(lambda x: x, 1, np.zeros((1, 1, 1), np.float32), 2,
                                                   finish=lambda win, block, _: (win, float(block.mean())), lookahead=1)))
    assert sum(w.width * w.height for w, _ in items) == 150 * 90
    assert all(m == 1.0 for _, m in items)
