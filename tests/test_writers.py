"""GeoTIFF writer: every block written once, whatever order rectangles arrive in; resumable."""
import numpy as np
import pytest
import rasterio

from bigseg.atomic import partial_path
from bigseg.errors import OutputError
from bigseg.tiling.geometry import Window
from bigseg.io.writers import BLOCK, GeoTiffWriter


def rectangles(width, height, seed):
    """A random partition of the image into rectangles, in a shuffled order."""
    rng = np.random.default_rng(seed)
    rows = sorted({0, height, *rng.integers(1, height, 6).tolist()})
    cols = sorted({0, width, *rng.integers(1, width, 5).tolist()})
    out = [Window(c0, r0, c1 - c0, r1 - r0) for r0, r1 in zip(rows, rows[1:]) for c0, c1 in zip(cols, cols[1:])]
    rng.shuffle(out)
    return out


@pytest.mark.parametrize("seed", [0, 1])
def test_every_block_row_is_written_once_and_whole(tmp_path, seed):
    width, height = 700, 1300
    rng = np.random.default_rng(seed)
    data = rng.integers(0, 200, (2, height, width)).astype(np.uint8)
    valid = rng.random((height, width)) > 0.1
    writer = GeoTiffWriter(tmp_path / "o.tif", width, height, 2, None, mask=True)
    writes = []
    real = writer.ds.write
    writer.ds.write = lambda arr, window: (writes.append(window), real(arr, window=window))
    for w in rectangles(width, height, seed):
        writer.write(w, data[(slice(None), *w.slices)], valid[w.slices])
    assert writer.rows_written == height
    assert sorted((int(w.row_off), int(w.height), int(w.col_off), int(w.width)) for w in writes) == \
        [(r, min(BLOCK, height - r), 0, width) for r in range(0, height, BLOCK)]
    writer.commit()
    with rasterio.open(tmp_path / "o.tif") as ds:
        assert np.array_equal(ds.read(), data)
        assert np.array_equal(ds.read_masks(1) > 0, valid)


def test_rows_written_counts_whole_block_rows_from_the_top(tmp_path):
    writer = GeoTiffWriter(tmp_path / "o.tif", 100, 1100, 1, None)
    writer.write(Window(0, 0, 100, 600), np.ones((600, 100), np.uint8))
    assert writer.rows_written == 512
    writer.write(Window(0, 1024, 100, 76), np.ones((76, 100), np.uint8))   # the last, short block row
    assert writer.rows_written == 512
    writer.write(Window(0, 600, 100, 424), np.ones((424, 100), np.uint8))
    assert writer.rows_written == 1100
    writer.abort()


def test_commit_refuses_an_incomplete_output(tmp_path):
    writer = GeoTiffWriter(tmp_path / "o.tif", 64, 600, 1, None)
    writer.write(Window(0, 0, 64, 512), np.zeros((512, 64), np.uint8))
    with pytest.raises(OutputError, match="never computed"):
        writer.commit()
    assert not (tmp_path / "o.tif").exists() and not partial_path(tmp_path / "o.tif").exists()






def test_the_overlay_has_a_legend_of_the_classes_it_shows(tmp_path):
    """Each class the preview shows gets its colour swatch (and name); one it does not show, none."""
    from bigseg.tiling.geometry import Window
    from bigseg.io.writers import OverlayWriter

    palette = [[200, 30, 30], [30, 200, 30], [30, 30, 200]]
    labels = np.zeros((400, 600), np.uint8)
    labels[:, 300:] = 2  # classes 0 and 2 shown, 1 not
    writer = OverlayWriter(tmp_path / "o.png", 600, 400, palette, classes=["red", "green", "blue"])
    writer.add_image(Window(0, 0, 600, 400), np.full((3, 400, 600), 128, np.float32))
    writer.write(Window(0, 0, 600, 400), labels)
    bare, drawn = writer.preview, writer.legend()
    changed = np.any(bare != drawn, axis=2)
    rows, cols = np.nonzero(changed)
    assert changed.any() and rows.min() > 200 and cols.max() < 300  # a panel in the lower left corner only
    panel = drawn[rows.min():rows.max() + 1, cols.min():cols.max() + 1].reshape(-1, 3).tolist()
    assert [200, 30, 30] in panel and [30, 30, 200] in panel and [30, 200, 30] not in panel
    tiny = OverlayWriter(tmp_path / "t.png", 12, 10, palette, classes=["red", "green", "blue"])
    tiny.add_image(Window(0, 0, 12, 10), np.zeros((3, 10, 12), np.float32))
    tiny.write(Window(0, 0, 12, 10), np.zeros((10, 12), np.uint8))
    assert np.array_equal(tiny.legend(), tiny.preview)  # no room for a legend: none
