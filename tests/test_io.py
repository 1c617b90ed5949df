"""Reading and writing rasters (`bigseg.io`): readers of every kind and their validity masks, the
streaming writers, the output kinds of a job and their names, and real rasters' edge cases."""
import json
from pathlib import Path

import numpy as np
import pytest
import rasterio

from bigseg.atomic import partial_path
from bigseg.checkpoint import load_checkpoint
from bigseg.errors import BigsegError, OutputError
from bigseg.infer.predictor import Predictor
from bigseg.io.outputs import (
    OutputSet,
    WriteOptions,
    describe,
    is_output_name,
    mask_path,
    part_path,
    sibling,
    writes_png,
)
from bigseg.io.readers import Georef, open_raster
from bigseg.io.writers import BLOCK, GeoTiffWriter, NODATA, OverlayWriter
from bigseg.run.file_job import predict_file
from bigseg.tiling.geometry import Window
from tests.cli_helpers import run_cli
from tests.conftest import write_geotiff


# --- Readers: band choice and order, deterministic rescaling, windowed tifffile reads.


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


# --- GeoTIFF writer: every block written once, whatever order rectangles arrive in; resumable.


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


# --- OutputSet: one place for output names and formats; every file committed together on success, all removed
# on an error (or kept for a journaled resume); nodata applied to every output.


CLASSES = ["sky", "road", "car"]


PALETTE = [[255, 0, 0], [0, 255, 0], [0, 0, 255]]


ALL = WriteOptions(probs=True, overlay=True)


def create(dst: Path, kind: str = "raster", write: WriteOptions = ALL, w: int = 64, h: int = 40) -> OutputSet:
    return OutputSet.create(dst, kind, w, h, Georef(), CLASSES, PALETTE, write)


def fill(outputs: OutputSet, w: int = 64, h: int = 40, valid: np.ndarray | None = None) -> None:
    labels = np.arange(w * h, dtype=np.uint8).reshape(h, w) % 3
    probs = np.full((3, h, w), 85, np.uint8)
    outputs.add_image(Window(0, 0, w, h), np.full((3, h, w), 200, np.float32))
    outputs.write(Window(0, 0, w, h), labels, probs, np.ones((h, w), bool) if valid is None else valid)


def test_names_and_formats_are_decided_in_one_place(tmp_path):
    assert mask_path(Path("a/b/photo.jpg"), Path("b/photo.jpg"), tmp_path) == tmp_path / "b" / "photo.mask.png"
    assert mask_path(Path("scene.tif"), Path("scene.tif"), tmp_path) == tmp_path / "scene.mask.tif"
    assert sibling(tmp_path / "scene.mask.tif", "probs", ".tif") == tmp_path / "scene.probs.tif"
    assert sibling(tmp_path / "out.tif", "overlay", ".png") == tmp_path / "out.overlay.png"
    assert part_path(tmp_path / "m.tif", 2, 8, "probs").name == ".m.probs.part-002-of-008.tif"
    assert all(is_output_name(Path(n)) for n in ("a.mask.tif", "a.probs.tif", "a.overlay.png", ".a.partial.tif"))
    assert not is_output_name(Path("mask_of_city.tif"))
    assert writes_png("image", Path("x.png")) and not writes_png("image", Path("x.tif"))
    assert not writes_png("raster", Path("x.png"))
    formats = [o["format"] for o in describe(tmp_path / "x.png", "image", 10, 10, 3, ALL)]
    assert formats == ["PNG", "GeoTIFF", "PNG"]
    assert [o["format"] for o in describe(tmp_path / "x.tif", "raster", 10, 10, 3, WriteOptions(cog=True))] == ["COG"]


@pytest.mark.parametrize("kind,name", [("raster", "o.mask.tif"), ("image", "o.mask.png")])
def test_every_file_is_committed_together_when_the_block_ends(tmp_path, kind, name):
    with create(tmp_path / name, kind) as outputs:
        fill(outputs)
        assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith(".")) == []
    assert [p.name for p in outputs.written] == [name, "o.probs.tif", "o.overlay.png"]
    styles = [f"{name}.aux.xml", "o.mask.qml"] if kind == "raster" else []  # class names for GIS tools
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([name, "o.probs.tif", "o.overlay.png", *styles])


def test_an_error_inside_the_block_removes_every_file(tmp_path):
    with pytest.raises(RuntimeError):
        with create(tmp_path / "o.mask.tif") as outputs:
            fill(outputs)
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


def test_keep_partial_keeps_only_the_resumable_geotiff_partials(tmp_path):
    with pytest.raises(KeyboardInterrupt):
        with create(tmp_path / "o.mask.tif") as outputs:
            fill(outputs)
            outputs.keep_partial = True
            raise KeyboardInterrupt
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [partial_path(tmp_path / "o.mask.tif").name, partial_path(tmp_path / "o.probs.tif").name])


def test_invalid_pixels_are_nodata_in_the_mask_zero_in_probabilities_and_bare_in_the_overlay(tmp_path):
    valid = np.ones((40, 64), bool)
    valid[:10, :20] = False
    with create(tmp_path / "o.mask.tif") as outputs:
        fill(outputs, valid=valid)
    with rasterio.open(tmp_path / "o.mask.tif") as m, rasterio.open(tmp_path / "o.probs.tif") as p:
        mask = m.read(1)
        assert (mask[:10, :20] == NODATA).all() and (mask[valid] < 3).all() and m.nodata == NODATA
        assert json.loads(m.tags()["classes"]) == CLASSES
        probs = p.read()
        assert (probs[:, :10, :20] == 0).all() and (probs[:, valid] == 85).all()
        assert ((p.read_masks(1) > 0) == valid).all()
    import cv2
    overlay = cv2.imread(str(tmp_path / "o.overlay.png"))[..., ::-1]
    assert (overlay[:10, :20] == 200).all()                  # the image itself where there is no label
    assert (overlay[valid] != 200).any()                      # blended with the palette elsewhere


def test_part_files_hold_their_rows_and_the_fingerprint(tmp_path):
    with OutputSet.part(tmp_path / "m.tif", 1, 2, 64, (24, 40), 3, True, "abc") as outputs:
        labels = np.full((16, 64), 2, np.uint8)
        outputs.write(Window(0, 24, 64, 16), labels, np.zeros((3, 16, 64), np.uint8), np.ones((16, 64), bool))
    for path in (part_path(tmp_path / "m.tif", 1, 2), part_path(tmp_path / "m.tif", 1, 2, "probs")):
        with rasterio.open(path) as ds:
            assert (ds.height, ds.width) == (16, 64) and ds.tags()["bigseg_fingerprint"] == "abc"
    with rasterio.open(part_path(tmp_path / "m.tif", 1, 2)) as ds:
        assert (ds.read(1) == 2).all()


def test_overlay_blends_the_image_samples_kept_from_the_reads():
    overlay = OverlayWriter(Path("unused.png"), 5000, 300, PALETTE, max_side=1000)
    image = np.random.default_rng(0).uniform(0, 255, (3, 300, 5000)).astype(np.float32)
    labels = np.random.default_rng(1).integers(0, 3, (300, 5000)).astype(np.uint8)
    labels[:, :100] = NODATA
    for c in range(0, 5000, 700):  # tiles arrive as rectangles; samples are kept per tile
        window = Window(c, 0, min(700, 5000 - c), 300)
        overlay.add_image(window, image[(slice(None), *window.slices)])
    overlay.write(Window(0, 0, 5000, 300), labels)
    rows, cols = overlay.rows, overlay.cols
    img = np.moveaxis(image[:, rows][:, :, cols], 0, -1)
    lab = labels[np.ix_(rows, cols)]
    expected = np.where((lab == NODATA)[..., None], img, 0.5 * img + 0.5 * overlay.lut[lab])
    assert np.array_equal(overlay.preview, np.clip(expected, 0, 255).astype(np.uint8))


def test_gis_tools_see_class_names_band_names_and_overviews(tmp_path):
    import xml.etree.ElementTree as ET

    with create(tmp_path / "o.mask.tif", w=5000, h=40) as outputs:
        fill(outputs, w=5000, h=40)
    pam = ET.parse(tmp_path / "o.mask.tif.aux.xml").getroot()
    assert [c.text for c in pam.iter("Category")] == CLASSES
    rows = [[f.text for f in row] for row in pam.iter("Row")]
    assert rows == [[str(i), c, *map(str, PALETTE[i])] for i, c in enumerate(CLASSES)]
    qml = ET.parse(tmp_path / "o.mask.qml").getroot()
    entries = [(e.get("value"), e.get("label"), e.get("color")) for e in qml.iter("paletteEntry")]
    assert entries == [("0", "sky", "#ff0000"), ("1", "road", "#00ff00"), ("2", "car", "#0000ff")]
    with rasterio.open(tmp_path / "o.probs.tif") as p, rasterio.open(tmp_path / "o.mask.tif") as m:
        assert p.descriptions == ("p(sky)", "p(road)", "p(car)")
        assert m.overviews(1) == [2, 4, 8, 16]   # 5000 px wide: drawn from overviews when zoomed out


def test_a_probability_file_without_any_valid_pixel_is_all_masked(tmp_path):
    with create(tmp_path / "o.mask.tif", write=WriteOptions(probs=True)) as outputs:
        outputs.write_nodata(Window(0, 0, 64, 40))     # nothing written: a sparse file
    with rasterio.open(tmp_path / "o.probs.tif") as p, rasterio.open(tmp_path / "o.mask.tif") as m:
        assert (p.read_masks(1) == 0).all() and (p.read() == 0).all()
        assert (m.read(1) == NODATA).all()


# --- Every real edge-case raster in ../shared/data/rasters either predicts with its georeference and nodata
# kept, or is refused with a clear reason. Skipped when the folder is absent.


REFUSED = {"corrupt.tif": "cannot be decoded"}


def test_every_shared_raster_predicts_or_is_refused(shared_data, tiny_checkpoint, tmp_path):
    seg = Predictor(load_checkpoint(tiny_checkpoint), "cpu", tile=256, overlap=64, batch_size=4)
    rasters = sorted((shared_data / "rasters").rglob("*.tif"))
    assert len(rasters) >= 15
    for src in rasters:
        dst = tmp_path / f"{src.stem}.mask.tif"
        if src.name in REFUSED:
            with pytest.raises(BigsegError, match=REFUSED[src.name]):
                predict_file(seg, src, dst)
            assert not dst.exists()
            continue
        predict_file(seg, src, dst)
        with rasterio.open(src) as a, rasterio.open(dst) as b:
            assert (b.width, b.height) == (a.width, a.height), src.name
            assert b.crs == (a.crs if not a.gcps[0] else None), src.name
            if a.gcps[0]:
                assert len(b.gcps[0]) == len(a.gcps[0]) and b.gcps[1] == a.gcps[1], src.name
            else:
                assert b.transform == a.transform, src.name
            invalid = a.dataset_mask() == 0
            out = b.read(1)
            assert (out[invalid] == 255).all(), src.name
            assert (out[~invalid] < 3).all(), src.name


def test_gdal_block_cache_is_64_mib_not_64_bytes():
    import rasterio

    from bigseg.io.gdal import gdal_env
    with gdal_env():
        assert rasterio.env.get_gdal_config("GDAL_CACHEMAX") == 64 * 2 ** 20


# --- remote inputs and areas of interest: imagery where it lives (bigseg.io.remote, bigseg.io.area)

def _cog(path: Path, width: int = 700, height: int = 600, seed: int = 4) -> Path:
    """A cloud-optimised GeoTIFF (256-px blocks, overviews) of random pixels in UTM, 0.5 m pixels."""
    from rasterio.transform import from_origin

    data = np.random.default_rng(seed).integers(1, 255, (3, height, width)).astype(np.uint8)
    with rasterio.open(path, "w", driver="COG", width=width, height=height, count=3, dtype="uint8", nodata=0,
                       crs="EPSG:32633", transform=from_origin(500000, 4000000, 0.5, 0.5), blocksize=256) as ds:
        ds.write(data)
    return path


def _predict(capsys, *args) -> None:
    code, _, err = run_cli(capsys, "predict", *map(str, args), "--tile", "128", "--overlap", "32", "--device", "cpu")
    assert code == 0, err


def _read(path: Path):
    with rasterio.open(path) as ds:
        return ds.read(1), ds.transform, ds.crs


def test_a_remote_cog_predicts_equal_to_the_same_file_read_locally_and_resumes_and_skips(
        tmp_path, tiny_checkpoint, capsys):
    from tests.http_server import serve

    (tmp_path / "served").mkdir()
    cog = _cog(tmp_path / "served" / "scene.tif")
    _predict(capsys, cog, "-m", tiny_checkpoint, "-o", tmp_path / "local.mask.tif")
    with serve(tmp_path / "served") as (url, sent):
        _predict(capsys, f"{url}/scene.tif?token=abc", "-m", tiny_checkpoint, "-o", tmp_path / "out")
        local, remote = _read(tmp_path / "local.mask.tif"), _read(tmp_path / "out" / "scene.mask.tif")
        assert np.array_equal(local[0], remote[0]) and local[1:] == remote[1:]
        fetched = sum(sent)
        code, out, err = run_cli(capsys, "predict", f"{url}/scene.tif?token=abc", "-m", tiny_checkpoint, "-o",
                                 tmp_path / "out", "--device", "cpu", "--json")
        assert code == 0 and json.loads(out)["skipped"] and sum(sent) == fetched  # finished: not even opened
        # /vsicurl/ paths are inputs too, and a text file lists a batch (URLs and paths beside it)
        (tmp_path / "copy.tif").write_bytes(cog.read_bytes())
        (tmp_path / "list.txt").write_text(f"# a batch\n/vsicurl/{url}/scene.tif\n\ncopy.tif\n")
        _predict(capsys, tmp_path / "list.txt", "-m", tiny_checkpoint, "-o", tmp_path / "batch")
    for name in ("scene", "copy"):
        assert np.array_equal(_read(tmp_path / "batch" / f"{name}.mask.tif")[0], local[0])


def test_a_server_without_range_requests_or_a_missing_url_is_one_clear_line(tmp_path, tiny_checkpoint, capsys):
    from tests.http_server import serve

    (tmp_path / "served").mkdir()
    _cog(tmp_path / "served" / "scene.tif")
    with serve(tmp_path / "served", ranges=False) as (url, _):
        code, _, err = run_cli(capsys, "predict", f"{url}/scene.tif", "-m", tiny_checkpoint, "-o", tmp_path / "o",
                               "--device", "cpu")
        assert code == 1 and "does not answer range requests" in err and "Traceback" not in err
        assert len([line for line in err.splitlines() if line.startswith("Error")]) == 1
    with serve(tmp_path / "served") as (url, _):
        code, _, err = run_cli(capsys, "predict", f"{url}/nothing.tif", "-m", tiny_checkpoint, "-o", tmp_path / "o",
                               "--device", "cpu")
        assert code == 1 and "nothing.tif" in err and "Traceback" not in err
    assert not list((tmp_path / "o").glob("*.tif")) if (tmp_path / "o").exists() else True


def _tiling_tolerance(capsys, src: Path, model: Path, whole: np.ndarray, tmp_path: Path) -> float:
    """How often the tiny model's labels agree between two tilings of the same scene (its receptive
    field reaches far beyond the overlap, so where tiles fall changes some labels): the tolerance a
    prediction on another tile grid is held to."""
    code, _, err = run_cli(capsys, "predict", src, "-m", model, "-o", tmp_path / "other.mask.tif", "--tile", "160",
                           "--overlap", "32", "--device", "cpu")
    assert code == 0, err
    return float((_read(tmp_path / "other.mask.tif")[0] == whole).mean())


def test_a_bbox_predicts_the_same_window_of_the_whole_scene_on_its_grid(tmp_path, tiny_checkpoint, capsys):
    from rasterio.windows import Window as RWindow

    src = _cog(tmp_path / "scene.tif")
    _predict(capsys, src, "-m", tiny_checkpoint, "-o", tmp_path / "whole.mask.tif")
    whole, transform, crs = _read(tmp_path / "whole.mask.tif")
    # columns 100..400 and rows 150..450, with edges inside pixels: the extent is rounded outward
    box = (500000 + 100.2 * 0.5, 4000000 - 449.7 * 0.5, 500000 + 399.6 * 0.5, 4000000 - 150.4 * 0.5)
    _predict(capsys, src, "-m", tiny_checkpoint, "-o", tmp_path / "box.mask.tif", "--bbox", ",".join(map(str, box)))
    part, part_transform, part_crs = _read(tmp_path / "box.mask.tif")
    assert part.shape == (300, 300) and part_crs == crs and part_transform == transform * transform.translation(100, 150)
    # exactly what the same window cut out as a file gives
    with rasterio.open(src) as ds:
        window = RWindow(100, 150, 300, 300)
        profile = {**ds.profile, "driver": "GTiff", "width": 300, "height": 300,
                   "transform": ds.window_transform(window)}
        with rasterio.open(tmp_path / "crop.tif", "w", **profile) as out:
            out.write(ds.read(window=window))
    _predict(capsys, tmp_path / "crop.tif", "-m", tiny_checkpoint, "-o", tmp_path / "crop.mask.tif")
    assert np.array_equal(_read(tmp_path / "crop.mask.tif")[0], part)
    # and the whole scene's labels there, away from the box's edges, within the tiling tolerance
    inner = (slice(40, -40), slice(40, -40))
    agree = (part[inner] == whole[150:450, 100:400][inner]).mean()
    assert agree >= _tiling_tolerance(capsys, src, tiny_checkpoint, whole, tmp_path) - 0.03, agree
    # the same box in longitudes and latitudes
    from pyproj import Transformer

    to_lonlat = Transformer.from_crs("EPSG:32633", "EPSG:4326", always_xy=True)
    (x0, y0), (x1, y1) = to_lonlat.transform(box[0] + 20, box[1] + 20), to_lonlat.transform(box[2] - 20, box[3] - 20)
    _predict(capsys, src, "-m", tiny_checkpoint, "-o", tmp_path / "ll.mask.tif", "--bbox", f"{x0},{y0},{x1},{y1}",
             "--bbox-crs", "EPSG:4326")
    ll, ll_transform, _ = _read(tmp_path / "ll.mask.tif")
    assert abs(ll.shape[0] - 220) <= 2 and abs(ll.shape[1] - 220) <= 2  # 40 m less on each axis, as asked


def test_a_polygon_aoi_reads_only_the_tiles_it_touches_and_leaves_outside_pixels_nodata(
        tmp_path, tiny_checkpoint, capsys, monkeypatch):
    import shapely
    from pyogrio.raw import write

    from bigseg.io.readers import GdalReader

    src = _cog(tmp_path / "scene.tif", 1200, 1000)
    _predict(capsys, src, "-m", tiny_checkpoint, "-o", tmp_path / "whole.mask.tif")
    whole, transform, _ = _read(tmp_path / "whole.mask.tif")
    # a triangle in EPSG:4326 over the UTM raster: reprojected, its extent is the output's
    from pyproj import Transformer

    corners = [transform * (c, r) for c, r in ((200, 150), (900, 300), (400, 850))]
    to_lonlat = Transformer.from_crs("EPSG:32633", "EPSG:4326", always_xy=True)
    triangle = shapely.Polygon([to_lonlat.transform(x, y) for x, y in corners])
    write(tmp_path / "aoi.gpkg", np.array([shapely.to_wkb(triangle)], dtype=object), {}, fields=[], crs="EPSG:4326",
          geometry_type="Polygon", driver="GPKG")
    reads = []
    real = GdalReader._read_raw
    monkeypatch.setattr(GdalReader, "_read_raw", lambda self, w: reads.append(w) or real(self, w))
    _predict(capsys, src, "-m", tiny_checkpoint, "-o", tmp_path / "aoi.mask.tif", "--aoi", tmp_path / "aoi.gpkg")
    read_aoi = sum(w.width * w.height for w in reads)
    reads.clear()
    _predict(capsys, src, "-m", tiny_checkpoint, "-o", tmp_path / "box.mask.tif", "--bbox",
             ",".join(map(str, shapely.Polygon(corners).bounds)))
    read_box = sum(w.width * w.height for w in reads)
    part, part_transform, _ = _read(tmp_path / "aoi.mask.tif")
    col0, row0 = round((part_transform.c - transform.c) / 0.5), round((transform.f - part_transform.f) / 0.5)
    assert (col0, row0) == (200, 150) and part.shape == (700, 700)
    utm = shapely.Polygon([((x - part_transform.c) / 0.5, (part_transform.f - y) / 0.5) for x, y in corners])
    rows, cols = np.mgrid[0:700, 0:700] + 0.5
    inside = shapely.contains_xy(utm, cols, rows)
    assert (part[~shapely.contains_xy(utm.buffer(1), cols, rows)] == NODATA).all()  # outside: nodata
    deep = shapely.contains_xy(utm.buffer(-40), cols, rows)
    tolerance = _tiling_tolerance(capsys, src, tiny_checkpoint, whole, tmp_path)
    assert (part[deep] == whole[150:850, 200:900][deep]).mean() >= tolerance - 0.03
    assert (part[inside] != NODATA).mean() > 0.99
    # the tiles that miss the triangle are never read: exactly their pixels fewer than for its box
    from bigseg.tiling.geometry import TileGrid

    assert _read(tmp_path / "box.mask.tif")[0].shape == part.shape
    missed = [w for w in TileGrid(700, 700, 128, 32)
              if not utm.intersects(shapely.box(w.col_off, w.row_off, w.col_end, w.row_end))]
    assert missed and read_box - read_aoi == sum(w.width * w.height for w in missed)


@pytest.mark.parametrize("args,line", [
    (("--bbox", "1,2,3"), "--bbox takes minx,miny,maxx,maxy (four numbers), got '1,2,3'"),
    (("--bbox", "3,2,1,4"), "--bbox must be minx,miny,maxx,maxy with min < max"),
    (("--bbox", "0,0,1,1"), "the area of interest does not overlap the image"),
    (("--bbox", "0,0,1,1", "--bbox-crs", "EPSG:999999"), "--bbox-crs is not a CRS pyproj knows"),
    (("--bbox-crs", "EPSG:4326"), "--bbox-crs needs --bbox"),
    (("--aoi", "nowhere.gpkg"), "area of interest not found: nowhere.gpkg"),
    (("--bbox", "0,0,1,1", "--aoi", "a.gpkg"), "--bbox and --aoi both give an area of interest"),
])
def test_a_wrong_area_of_interest_is_one_line(tmp_path, tiny_checkpoint, capsys, monkeypatch, args, line):
    monkeypatch.chdir(tmp_path)
    src = _cog(tmp_path / "scene.tif", 300, 300)
    code, _, err = run_cli(capsys, "predict", src, "-m", tiny_checkpoint, "-o", tmp_path / "o", "--device", "cpu", *args)
    assert code == 1 and line in err and "Traceback" not in err, err
    assert not (tmp_path / "o" / "scene.mask.tif").exists()


def test_an_area_of_interest_needs_a_georeferenced_input(tmp_path, tiny_checkpoint, capsys):
    import cv2

    cv2.imwrite(str(tmp_path / "photo.png"), np.random.default_rng(0).integers(0, 255, (80, 90, 3), np.uint8))
    code, _, err = run_cli(capsys, "predict", tmp_path / "photo.png", "-m", tiny_checkpoint, "-o", tmp_path / "o",
                           "--device", "cpu", "--bbox", "0,0,10,10")
    assert code == 1 and "photo.png has no georeferencing (CRS and transform): an area of interest needs" in err


def _stac_item(path: Path, href: str, key: str = "visual", item_id: str = "scene-2024") -> Path:
    """A STAC item (written with pystac) whose asset `key` points at `href`."""
    import datetime

    import pystac

    item = pystac.Item(item_id, {"type": "Point", "coordinates": [15.0, 36.1]}, [14.9, 36.0, 15.1, 36.2],
                       datetime.datetime(2024, 6, 1), {})
    item.add_asset("thumbnail", pystac.Asset("thumb.png", media_type=pystac.MediaType.PNG, roles=["thumbnail"]))
    item.add_asset(key, pystac.Asset(href, media_type=pystac.MediaType.COG, roles=["data"]))
    item.set_self_href(str(path))
    path.write_text(json.dumps(item.to_dict(include_self_link=False, transform_hrefs=False)))
    return path


def test_a_stac_item_predicts_its_asset_named_by_the_item_id(tmp_path, tiny_checkpoint, capsys):
    pytest.importorskip("pystac")
    from tests.http_server import serve

    (tmp_path / "served").mkdir()
    cog = _cog(tmp_path / "served" / "scene.tif")
    _predict(capsys, cog, "-m", tiny_checkpoint, "-o", tmp_path / "local.mask.tif")
    local = _read(tmp_path / "local.mask.tif")
    _stac_item(tmp_path / "served" / "item.json", "./scene.tif")  # relative to the item, as catalogues write it
    _stac_item(tmp_path / "served" / "rgb.json", "./scene.tif", key="image", item_id="two")
    with serve(tmp_path / "served") as (url, _):
        _predict(capsys, f"{url}/item.json", "-m", tiny_checkpoint, "-o", tmp_path / "out")  # the item remote
        _predict(capsys, _stac_item(tmp_path / "local.json", f"{url}/scene.tif", item_id="three"), "-m",
                 tiny_checkpoint, "-o", tmp_path / "out")  # a local item of a remote asset
        code, _, err = run_cli(capsys, "predict", f"{url}/rgb.json", "-m", tiny_checkpoint, "-o", tmp_path / "out",
                               "--device", "cpu", "--asset", "nir")
        assert code == 1 and "has no asset 'nir'; it has thumbnail, image" in err
        _predict(capsys, f"{url}/rgb.json", "-m", tiny_checkpoint, "-o", tmp_path / "out", "--asset", "image")
    for name in ("scene-2024", "three", "two"):
        got = _read(tmp_path / "out" / f"{name}.mask.tif")
        assert np.array_equal(got[0], local[0]) and got[1:] == local[1:]


def _with_pixel_size(checkpoint: Path, metres: float, out: Path) -> Path:
    from bigseg.checkpoint import save_checkpoint

    ckpt = load_checkpoint(checkpoint)
    ckpt.input = {**ckpt.input, "pixel_size": [metres, metres], "units": "metre"}
    return save_checkpoint(ckpt, out)


def test_a_raster_finer_than_the_model_is_predicted_at_the_models_pixel_size_and_written_on_its_own_grid(
        tmp_path, tiny_checkpoint, capsys):
    """Resampling a 0.5 m raster for a 1 m model equals predicting the downsampled raster and
    upsampling its labels; `--output-grid model` writes the downsampled prediction itself."""
    from bigseg.io.readers import resampled_view

    model = _with_pixel_size(tiny_checkpoint, 1.0, tmp_path / "one-metre.pt")
    src = _cog(tmp_path / "scene.tif", 400, 300)
    code, _, err = run_cli(capsys, "predict", src, "-m", model, "-o", tmp_path / "out.mask.tif", "--device", "cpu",
                           "--tile", "128", "--overlap", "32", "--probs", "--areas")
    assert code == 0 and "read at the model's 1 metre pixels, resampled from the input's 0.5" in err, err
    code, out, err = run_cli(capsys, "predict", src, "-m", model, "-o", tmp_path / "plan.mask.tif", "--device", "cpu",
                             "--dry-run", "--json")
    plan = json.loads(out)[0]
    assert code == 0 and (plan["width"], plan["height"]) == (200, 150) and "outputs on the input's grid, 400x300" in plan["notes"]
    with rasterio.open(src) as ds, resampled_view(ds, 1.0) as view:  # what the model saw
        profile = {**ds.profile, "driver": "GTiff", "width": view.width, "height": view.height,
                   "transform": view.transform}
        with rasterio.open(tmp_path / "down.tif", "w", **profile) as down:
            down.write(view.read())
        view.src_dataset.close()
    _predict(capsys, tmp_path / "down.tif", "-m", model, "-o", tmp_path / "down.mask.tif", "--resolution", "native")
    down, down_transform, _ = _read(tmp_path / "down.mask.tif")
    out, out_transform, _ = _read(tmp_path / "out.mask.tif")
    _, src_transform, _ = _read(src)
    assert out.shape == (300, 400) and out_transform == src_transform and down.shape == (150, 200)
    assert np.array_equal(out, np.repeat(np.repeat(down, 2, 0), 2, 1))
    assert (tmp_path / "out.probs.tif").is_file() and (tmp_path / "out.areas.csv").is_file()
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]  # the hidden model-grid job is gone
    _predict(capsys, src, "-m", model, "-o", tmp_path / "model.mask.tif", "--output-grid", "model")
    same, same_transform, _ = _read(tmp_path / "model.mask.tif")
    assert np.array_equal(same, down) and same_transform == down_transform
    # within the tolerance of the model's pixel size, or with --resolution native: read as it is, with a warning
    code, _, err = run_cli(capsys, "predict", src, "-m", model, "-o", tmp_path / "native.mask.tif", "--device", "cpu",
                           "--resolution", "native")
    assert code == 0 and "pixels are 0.5 metre, the model was trained on 1 metre" in err
    assert _read(tmp_path / "native.mask.tif")[0].shape == (300, 400)


def test_a_remote_cog_is_read_through_its_overviews_at_a_coarser_resolution(tmp_path, tiny_checkpoint, capsys):
    from tests.http_server import serve

    (tmp_path / "served").mkdir()
    cog = _cog(tmp_path / "served" / "scene.tif", 1400, 1200)
    with rasterio.open(cog) as ds:
        assert ds.overviews(1)  # the COG driver wrote them
    args = ("-m", tiny_checkpoint, "--resolution", "2", "--output-grid", "model")
    _predict(capsys, cog, *args, "-o", tmp_path / "local.mask.tif")
    with serve(tmp_path / "served") as (url, sent):
        _predict(capsys, f"{url}/scene.tif", *args, "-o", tmp_path / "remote.mask.tif")
    local, remote = _read(tmp_path / "local.mask.tif"), _read(tmp_path / "remote.mask.tif")
    assert np.array_equal(local[0], remote[0]) and local[1:] == remote[1:] and local[0].shape == (300, 350)
    assert sum(sent) < 0.4 * cog.stat().st_size  # the 2 m overview, not the 0.5 m pixels


@pytest.mark.parametrize("args,line", [
    (("--resolution", "fine"), "--resolution takes model, native or a pixel size in metres, got 'fine'"),
    (("--resolution", "-1"), "--resolution takes model, native or a pixel size in metres, got '-1'"),
    (("--output-grid", "mine"), "--output-grid takes input or model, got 'mine'"),
    (("--resolution", "1", "--reader", "tifffile"), "--reader tifffile reads at the file's own resolution"),
])
def test_a_wrong_resolution_is_one_line(tmp_path, tiny_checkpoint, capsys, args, line):
    src = _cog(tmp_path / "scene.tif", 200, 200)
    code, _, err = run_cli(capsys, "predict", src, "-m", tiny_checkpoint, "-o", tmp_path / "o", "--device", "cpu", *args)
    assert code == 1 and line in err and "Traceback" not in err, err


def _lonlat_or_mercator(path: Path, crs: str, pixel: float, width: int = 64) -> Path:
    """A raster at 45 degrees north, longitude 10, with square pixels of `pixel` in `crs`'s units."""
    from pyproj import Transformer
    from rasterio.transform import from_origin

    x, y = (10.0, 45.0) if crs == "EPSG:4326" else Transformer.from_crs(4326, crs, always_xy=True).transform(10, 45)
    data = np.random.default_rng(0).integers(0, 255, (3, width, width), dtype=np.uint8)
    with rasterio.open(path, "w", driver="GTiff", width=width, height=width, count=3, dtype="uint8", crs=crs,
                       transform=from_origin(x, y, pixel, pixel)) as ds:
        ds.write(data)
    return path


def test_pixel_sizes_are_compared_on_the_ground_in_degrees_and_in_web_mercator(tmp_path, tiny_checkpoint, capsys):
    """In a geographic CRS a pixel is measured on the ellipsoid; in Web Mercator a CRS metre is
    1/cos(latitude) ground metres (at 45 degrees a 0.7 m CRS pixel is 0.495 m on the ground: twice
    as fine as a 1 m model, no longer within its tolerance)."""
    lonlat = _lonlat_or_mercator(tmp_path / "lonlat.tif", "EPSG:4326", 1e-5)  # 0.79 m across, 1.11 m down
    code, out, err = run_cli(capsys, "predict", lonlat, "-m", tiny_checkpoint, "-o", tmp_path / "o", "--device", "cpu",
                             "--resolution", "2", "--dry-run", "--json")
    plan = json.loads(out)[0]
    assert code == 0 and (plan["width"], plan["height"]) == (30, 30), (plan, err)  # 64 x 0.936 m / 2 m
    assert any("read at 2 m pixels (resampled from 0.936 m (1e-05 degree in its CRS)" in n for n in plan["notes"])

    model = _with_pixel_size(tiny_checkpoint, 1.0, tmp_path / "one-metre.pt")
    mercator = _lonlat_or_mercator(tmp_path / "mercator.tif", "EPSG:3857", 0.7, width=128)
    code, out, err = run_cli(capsys, "predict", mercator, "-m", model, "-o", tmp_path / "o", "--device", "cpu",
                             "--dry-run", "--json")
    plan = json.loads(out)[0]
    assert code == 0 and (plan["width"], plan["height"]) == (64, 64), (plan, err)  # 128 x 0.495 m / 1 m
    assert any("read at the model's 1 metre pixels, resampled from the input's 0.495 m (0.7 metre in its CRS)" in n
               for n in plan["notes"]), plan["notes"]
    code, _, err = run_cli(capsys, "predict", mercator, "-m", model, "-o", tmp_path / "native", "--device", "cpu",
                           "--resolution", "native", "--tile", "128")
    assert code == 0 and "the input's pixels are 0.495 m (0.7 metre in its CRS), the model was trained on 1 metre: " \
                         "objects look 2x their trained size" in err, err

    # coordinates that are not on the Earth cannot be measured in metres: one line
    src = write_geotiff(tmp_path / "nowhere.tif", 64, 64, crs="EPSG:4326")  # longitude 500000
    code, _, err = run_cli(capsys, "predict", src, "-m", tiny_checkpoint, "-o", tmp_path / "o", "--device", "cpu",
                           "--resolution", "2")
    assert code == 1 and "pixels cannot be measured on the ground" in err and "Traceback" not in err, err


def test_an_interrupted_remote_job_resumes_and_equals_the_uninterrupted_one(tmp_path, tiny_checkpoint, capsys):
    from bigseg.io.remote import RemotePath
    from bigseg.run.file_job import JobOptions
    from tests.conftest import interrupt_after
    from tests.http_server import serve

    (tmp_path / "served").mkdir()
    cog = _cog(tmp_path / "served" / "scene.tif", 300, 1200)
    ckpt = load_checkpoint(tiny_checkpoint)
    whole = predict_file(Predictor(ckpt, "cpu", tile=64, overlap=16), cog, tmp_path / "w.tif")
    with serve(tmp_path / "served") as (url, _):
        src = RemotePath(f"{url}/scene.tif")
        seg = Predictor(ckpt, "cpu", tile=64, overlap=16)
        interrupt_after(seg, 20)
        with pytest.raises(KeyboardInterrupt):
            predict_file(seg, src, tmp_path / "r.tif", JobOptions(journal_seconds=0))
        resumed = predict_file(Predictor(ckpt, "cpu", tile=64, overlap=16), src, tmp_path / "r.tif")
    assert any("resuming" in n for n in resumed.notes), resumed.notes
    assert np.array_equal(_read(whole.output)[0], _read(resumed.output)[0])


def test_a_server_that_keeps_failing_is_retried_then_one_line(tmp_path, tiny_checkpoint, capsys, monkeypatch):
    from tests.http_server import serve

    monkeypatch.setenv("GDAL_HTTP_RETRY_DELAY", "0.05")  # the environment's own GDAL settings win
    (tmp_path / "served").mkdir()
    _cog(tmp_path / "served" / "scene.tif")
    with serve(tmp_path / "served", fail=503) as (url, sent):
        code, _, err = run_cli(capsys, "predict", f"{url}/scene.tif", "-m", tiny_checkpoint, "-o", tmp_path / "o",
                               "--device", "cpu")
    assert code == 1 and "scene.tif: cannot be read" in err and "retried 4 times" in err, err
    assert len(sent) >= 5  # the first request and four retries
