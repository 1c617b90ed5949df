"""GeoTIFF writer: every block written once, whatever order rectangles arrive in; resumable."""
import numpy as np
import pytest
import rasterio

from bigseg.checkpoint import load_checkpoint
from bigseg.errors import OutputError
from bigseg.inference import Segmenter, WriteOptions
from bigseg.io.writers import BLOCK, GeoTiffWriter, partial_path
from bigseg.journal import read_journal
from bigseg.tiling import Window
from tests.conftest import interrupt_after, write_geotiff


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


def test_a_damaged_partial_output_starts_over_instead_of_failing(tmp_path, tiny_checkpoint):
    src = write_geotiff(tmp_path / "a.tif", 200, 1300)
    ckpt = load_checkpoint(tiny_checkpoint)
    whole = tmp_path / "whole.tif"
    Segmenter(ckpt, "cpu", tile=64, overlap=16).predict_file(src, whole)
    seg = Segmenter(ckpt, "cpu", tile=64, overlap=16, journal_seconds=0)
    interrupt_after(seg, 25)
    dst = tmp_path / "r.tif"
    with pytest.raises(KeyboardInterrupt):
        seg.predict_file(src, dst)
    assert read_journal(dst)["rows_done"] in (512, 1024)
    partial = partial_path(dst)
    raw = partial.read_bytes()
    # blocks are written once, so a crash can only cut what follows the last sync: the TIFF
    # directory that libtiff appends at the end when the file is closed
    partial.write_bytes(raw[: len(raw) - 200])
    result = Segmenter(ckpt, "cpu", tile=64, overlap=16).predict_file(src, dst)
    assert any("unusable" in n and "starting over" in n for n in result.notes), result.notes
    with rasterio.open(whole) as a, rasterio.open(dst) as b:
        assert np.array_equal(a.read(), b.read())


def test_gdal_threads_change_nothing_in_the_outputs(tmp_path, tiny_checkpoint):
    src = write_geotiff(tmp_path / "a.tif", 700, 1100, nodata=0, compress="deflate")
    ckpt = load_checkpoint(tiny_checkpoint)
    for threads in (1, 3):
        seg = Segmenter(ckpt, "cpu", tile=128, overlap=32, io_threads=threads)
        seg.predict_file(src, tmp_path / f"t{threads}.tif", write=WriteOptions(probs=True))
    for name in ("t{}.tif", "t{}.probs.tif"):
        with rasterio.open(tmp_path / name.format(1)) as a, rasterio.open(tmp_path / name.format(3)) as b:
            assert np.array_equal(a.read(), b.read()) and np.array_equal(a.read_masks(1), b.read_masks(1))
