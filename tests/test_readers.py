"""Readers: band choice and order, deterministic rescaling, windowed tifffile reads."""
import numpy as np
import pytest

from bigseg.geometry import Window
from bigseg.io.readers import open_raster
from tests.conftest import write_geotiff


def test_bands_option_picks_and_orders_bands(tmp_path):
    data = np.stack([np.full((40, 50), v, np.uint8) for v in (10, 20, 30, 40)])
    src = write_geotiff(tmp_path / "rgbn.tif", 50, 40, count=4, data=data, photometric="MINISBLACK")
    with open_raster(src, 3, (4, 3, 2)) as r:
        pixels, _ = r.read(Window(0, 0, 50, 40))
    assert [float(b.mean()) for b in pixels] == [40, 30, 20]
    with open_raster(src, 3) as r:
        assert r.plan.indexes == (1, 2, 3) and "pass --bands" in r.notes[0]


def test_sixteen_bit_rescale_is_deterministic_percentiles(tmp_path):
    ramp = np.tile(np.arange(1000, dtype=np.uint16) * 10, (3, 50, 1))
    src = write_geotiff(tmp_path / "u16.tif", 1000, 50, dtype="uint16", data=ramp)
    with open_raster(src) as r:
        a, _ = r.read(Window(0, 0, 1000, 50))
    with open_raster(src) as r:
        b, _ = r.read(Window(0, 0, 1000, 50))
    assert np.array_equal(a, b)
    assert a.min() == 0 and a.max() == 255
    assert a[0, 0, 500] == pytest.approx(127.5, abs=2)  # the middle of the 2..98 % range
    with open_raster(src, value_range=(0, 20000)) as r:
        c, _ = r.read(Window(0, 0, 1000, 50))
    assert c[0, 0, 999] == pytest.approx(9990 * 255 / 20000, abs=0.01)


def test_tifffile_reader_reads_windows_of_tiled_and_striped_tiffs(tmp_path):
    import tifffile

    img = np.random.default_rng(0).integers(0, 255, (300, 500, 3)).astype(np.uint8)
    tifffile.imwrite(tmp_path / "t.ome.tif", img, tile=(128, 128), photometric="rgb", compression="zlib")
    tifffile.imwrite(tmp_path / "s.tif", img, photometric="rgb", rowsperstrip=37)
    for path, engine in ((tmp_path / "t.ome.tif", "auto"), (tmp_path / "s.tif", "tifffile")):
        with open_raster(path, engine=engine) as r:
            assert type(r).__name__ == "TiffFileReader"
            data, valid = r.read(Window(130, 70, 250, 200))
        assert valid.all() and np.array_equal(data, np.moveaxis(img[70:270, 130:380], -1, 0))
