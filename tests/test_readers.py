"""Readers: band choice and order, deterministic rescaling, windowed tifffile reads."""
import numpy as np
import pytest

from bigseg.tiling.geometry import Window
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


def phone_jpeg(path, image_bgr, orientation: int):
    """A JPEG with an EXIF Orientation tag, as phones write them (pixels stored as the sensor saw them)."""
    import struct

    import cv2

    ok, jpg = cv2.imencode(".jpg", image_bgr, [cv2.IMWRITE_JPEG_QUALITY, 98])
    jpg = jpg.tobytes()
    tiff = (b"MM\x00*" + struct.pack(">I", 8) + struct.pack(">H", 1)
            + struct.pack(">HHI", 0x0112, 3, 1) + struct.pack(">HH", orientation, 0) + struct.pack(">I", 0))
    app1 = b"\xff\xe1" + struct.pack(">H", 8 + len(tiff)) + b"Exif\x00\x00" + tiff
    path.write_bytes(jpg[:2] + app1 + jpg[2:])
    return path


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_is_applied_so_pixels_are_as_every_viewer_shows_them(tmp_path, orientation):
    import cv2

    from bigseg.tiling.geometry import Window
    from bigseg.io.readers import open_raster

    image = np.zeros((60, 100, 3), np.uint8)
    image[:20, :30] = (0, 0, 255)   # a red block top-left, a green one bottom-right: every turn differs
    image[45:, 80:] = (0, 255, 0)
    path = phone_jpeg(tmp_path / "phone.jpg", image, orientation)
    shown = cv2.imread(str(path), cv2.IMREAD_COLOR)  # OpenCV's own EXIF handling: what viewers show
    with open_raster(path) as reader:
        data, _ = reader.read(Window(0, 0, reader.width, reader.height))
        notes = reader.notes
    assert (reader.height, reader.width) == shown.shape[:2]
    assert np.abs(data.transpose(1, 2, 0)[..., ::-1] - shown.astype(np.float32)).max() == 0
    assert any("EXIF orientation" in n for n in notes) == (orientation != 1)


def test_the_mask_of_a_sideways_phone_photo_matches_the_photo_as_displayed(tmp_path, tiny_checkpoint, capsys):
    import cv2

    from tests.cli_helpers import run_cli

    image = np.random.default_rng(0).integers(0, 255, (60, 100, 3)).astype(np.uint8)
    phone_jpeg(tmp_path / "phone.jpg", image, 6)
    code, _, err = run_cli(capsys, "predict", tmp_path / "phone.jpg", "-m", tiny_checkpoint, "-o", tmp_path / "out",
                           "--overlay", "--device", "cpu", "--tile", "64")
    assert code == 0 and "EXIF orientation 6" in err, err
    mask = cv2.imread(str(tmp_path / "out" / "phone.mask.png"), cv2.IMREAD_UNCHANGED)
    overlay = cv2.imread(str(tmp_path / "out" / "phone.overlay.png"))
    assert mask.shape == (100, 60) and overlay.shape[:2] == (100, 60)  # turned, as the photo is shown


def test_an_image_over_opencvs_pixel_limit_is_read_in_windows_by_gdal(tmp_path, monkeypatch):
    import cv2

    from bigseg.tiling.geometry import Window
    from bigseg.io.readers import open_raster

    image = np.random.default_rng(1).integers(0, 255, (50, 70, 3)).astype(np.uint8)
    cv2.imwrite(str(tmp_path / "a.png"), image)
    monkeypatch.setenv("CV_IO_MAX_IMAGE_PIXELS", "1000")  # as if this small PNG were beyond OpenCV
    with open_raster(tmp_path / "a.png") as reader:
        data, _ = reader.read(Window(10, 5, 30, 20))
        assert type(reader).__name__ == "GdalReader" and "over OpenCV's limit" in reader.notes[-1]
    assert np.array_equal(data.transpose(1, 2, 0), image[5:25, 10:40, ::-1])
