"""OutputSet: one place for output names and formats; every file committed together on success,
all removed on an error (or kept for a journaled resume); nodata applied to every output."""
import json
from pathlib import Path

import numpy as np
import pytest
import rasterio

from bigseg.atomic import partial_path
from bigseg.tiling.geometry import Window
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
from bigseg.io.readers import Georef
from bigseg.io.writers import NODATA, OverlayWriter

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
