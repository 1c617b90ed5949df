"""`bigseg predict` end to end: geospatial outputs, nodata, batch semantics, atomic writes, bad inputs."""
import json
from pathlib import Path

import numpy as np
import pytest
import rasterio

from bigseg.checkpoint import from_model, load_checkpoint, save_checkpoint
from bigseg.inference import Segmenter, WriteOptions
from bigseg.io.readers import open_raster
from bigseg.tiling import Window
from tests.cli_helpers import run_cli
from tests.conftest import CLASSES, interrupt_after, tiny_model, write_geotiff

FAST = ["--tile", "128", "--overlap", "32", "--device", "cpu"]


def files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_geotiff_mask_keeps_size_georeference_palette_and_nodata(tmp_path, tiny_checkpoint, capsys):
    data = np.random.default_rng(0).integers(1, 255, (3, 300, 410)).astype(np.uint8)
    data[:, :50, :60] = 0
    src = write_geotiff(tmp_path / "scene.tif", 410, 300, nodata=0, data=data)
    code, _, err = run_cli(capsys, "predict", src, "-m", tiny_checkpoint, "-o", tmp_path / "out", *FAST)
    assert code == 0, err
    with rasterio.open(src) as a, rasterio.open(tmp_path / "out" / "scene.mask.tif") as b:
        assert (b.width, b.height, b.count, b.dtypes[0]) == (410, 300, 1, "uint8")
        assert b.crs == a.crs and b.transform == a.transform and b.nodata == 255
        assert b.profile["tiled"] and b.profile["compress"] == "deflate"
        cmap = b.colormap(1)
        ckpt = load_checkpoint(tiny_checkpoint)
        assert [list(cmap[i][:3]) for i in range(3)] == ckpt.palette
        mask = b.read(1)
        assert json.loads(b.tags()["classes"]) == CLASSES
    assert (mask[:50, :60] == 255).all()
    assert mask[50:].max() < 3 and mask[:, 60:].max() < 3


def test_file_output_equals_the_in_memory_api(tmp_path, tiny_checkpoint):
    src = write_geotiff(tmp_path / "a.tif", 333, 257)
    seg = Segmenter(load_checkpoint(tiny_checkpoint), "cpu", "fp32", tile=128, overlap=32, batch_size=3)
    seg.predict_file(src, tmp_path / "a.mask.tif")
    with rasterio.open(src) as ds:
        image = ds.read()
    with rasterio.open(tmp_path / "a.mask.tif") as ds:
        assert np.array_equal(ds.read(1), seg.segment(image))


def test_batch_size_does_not_change_the_result(tmp_path, tiny_checkpoint):
    image = np.random.default_rng(3).uniform(0, 255, (3, 200, 300)).astype(np.float32)
    ckpt = load_checkpoint(tiny_checkpoint)
    a = Segmenter(ckpt, "cpu", "fp32", tile=128, overlap=32, batch_size=1).scores(image)
    b = Segmenter(ckpt, "cpu", "fp32", tile=128, overlap=32, batch_size=5).scores(image)
    np.testing.assert_allclose(a, b, atol=1e-4)


def test_png_input_gives_png_mask_and_extras(tmp_path, tiny_checkpoint, capsys):
    import cv2

    img = np.random.default_rng(1).integers(0, 255, (150, 230, 3)).astype(np.uint8)
    cv2.imwrite(str(tmp_path / "photo.png"), img)
    code, _, err = run_cli(capsys, "predict", tmp_path / "photo.png", "-m", tiny_checkpoint,
                           "-o", tmp_path / "o", "--probs", "--overlay", *FAST)
    assert code == 0, err
    assert files(tmp_path / "o") == ["photo.mask.png", "photo.overlay.png", "photo.probs.tif"]
    mask = cv2.imread(str(tmp_path / "o" / "photo.mask.png"), cv2.IMREAD_UNCHANGED)
    assert mask.shape == (150, 230) and mask.dtype == np.uint8 and mask.max() < 3
    with rasterio.open(tmp_path / "o" / "photo.probs.tif") as p:
        probs = p.read().astype(int)
    assert p.count == 3 and np.abs(probs.sum(0) - 255).max() <= 2
    assert np.array_equal(probs.argmax(0), mask) or (probs.argmax(0) == mask).mean() > 0.99


def test_cog_output_is_cloud_optimised_with_overviews(tmp_path, tiny_checkpoint, capsys):
    src = write_geotiff(tmp_path / "big.tif", 1200, 1100)
    code, _, err = run_cli(capsys, "predict", src, "-m", tiny_checkpoint, "-o", tmp_path / "o", "--cog",
                           "--tile", "256", "--overlap", "64", "--batch-size", "8")
    assert code == 0, err
    with rasterio.open(tmp_path / "o" / "big.mask.tif") as ds:
        assert ds.tags(ns="IMAGE_STRUCTURE").get("LAYOUT") == "COG"
        assert ds.overviews(1) and ds.colormap(1)[255][3] == 0
    assert files(tmp_path / "o") == ["big.mask.tif"]


@pytest.mark.parametrize("form", ["nodata", "alpha", "internal_mask", "external_mask", "nan"])
def test_every_nodata_form_becomes_output_nodata(tmp_path, tiny_checkpoint, form):
    rng = np.random.default_rng(2)
    hole = (slice(20, 70), slice(30, 100))
    if form == "nan":
        data = rng.uniform(0, 1000, (3, 150, 160)).astype(np.float32)
        data[(slice(None), *hole)] = np.nan
        src = write_geotiff(tmp_path / "f.tif", 160, 150, dtype="float32", data=data)
    elif form == "alpha":
        data = rng.integers(1, 255, (4, 150, 160)).astype(np.uint8)
        data[3] = 255
        data[(3, *hole)] = 0
        src = write_geotiff(tmp_path / "f.tif", 160, 150, count=4, data=data, photometric="RGB", alpha="YES")
    else:
        data = rng.integers(1, 255, (3, 150, 160)).astype(np.uint8)
        if form == "nodata":
            data[(slice(None), *hole)] = 0
        src = write_geotiff(tmp_path / "f.tif", 160, 150, data=data, nodata=0 if form == "nodata" else None)
        if form.endswith("mask"):
            mask = np.full((150, 160), 255, np.uint8)
            mask[hole] = 0
            with rasterio.Env(GDAL_TIFF_INTERNAL_MASK=form == "internal_mask"):
                with rasterio.open(src, "r+") as ds:
                    ds.write_mask(mask)
            assert Path(str(src) + ".msk").exists() == (form == "external_mask")
    seg = Segmenter(load_checkpoint(tiny_checkpoint), "cpu", tile=64, overlap=16)
    seg.predict_file(src, tmp_path / "f.mask.tif")
    with rasterio.open(tmp_path / "f.mask.tif") as ds:
        out = ds.read(1)
    assert (out[hole] == 255).all()
    outside = np.ones_like(out, bool)
    outside[hole] = False
    assert (out[outside] < 3).all()


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


def test_existing_outputs_are_skipped_unless_overwrite(tmp_path, tiny_checkpoint, capsys):
    src = write_geotiff(tmp_path / "a.tif", 100, 90)
    out = tmp_path / "o"
    assert run_cli(capsys, "predict", src, "-m", tiny_checkpoint, "-o", out, *FAST)[0] == 0
    first = (out / "a.mask.tif").stat().st_mtime_ns
    code, _, err = run_cli(capsys, "predict", src, "-m", tiny_checkpoint, "-o", out, *FAST)
    assert code == 0 and "skipped" in err and (out / "a.mask.tif").stat().st_mtime_ns == first
    assert run_cli(capsys, "predict", src, "-m", tiny_checkpoint, "-o", out, "--overwrite", *FAST)[0] == 0
    assert (out / "a.mask.tif").stat().st_mtime_ns != first


def test_batch_continues_past_bad_files_and_fails_at_the_end(tmp_path, tiny_checkpoint, capsys):
    folder = tmp_path / "in"
    (folder / "sub").mkdir(parents=True)
    write_geotiff(folder / "a.tif", 100, 80)
    write_geotiff(folder / "sub" / "b.tif", 90, 70)
    (folder / "broken.tif").write_text("not a tiff")
    code, out, err = run_cli(capsys, "predict", folder, "-m", tiny_checkpoint, "-o", tmp_path / "o",
                             "--recursive", "--json", *FAST)
    assert code == 1
    summary = json.loads(out)
    assert [Path(d["output"]).name for d in summary["done"]] == ["a.mask.tif", "b.mask.tif"]
    assert (tmp_path / "o" / "sub" / "b.mask.tif").exists()
    assert len(summary["failed"]) == 1 and "broken.tif" in summary["failed"][0]["error"]
    assert files(tmp_path / "o") == ["a.mask.tif", "sub"]


def test_globs_expand(tmp_path, tiny_checkpoint, capsys):
    for name in ("x1.tif", "x2.tif", "y.tif"):
        write_geotiff(tmp_path / name, 64, 64)
    code, _, err = run_cli(capsys, "predict", str(tmp_path / "x*.tif"), "-m", tiny_checkpoint,
                           "-o", tmp_path / "o", *FAST)
    assert code == 0, err
    assert files(tmp_path / "o") == ["x1.mask.tif", "x2.mask.tif"]
    assert "2 done, 0 skipped, 0 failed" in err


def test_an_interrupted_run_leaves_no_output(tmp_path, tiny_checkpoint, monkeypatch):
    src = write_geotiff(tmp_path / "a.tif", 400, 400)
    seg = Segmenter(load_checkpoint(tiny_checkpoint), "cpu", tile=64, overlap=16, batch_size=2)
    interrupt_after(seg, 6)
    out = tmp_path / "o"
    out.mkdir()
    with pytest.raises(KeyboardInterrupt):
        seg.predict_file(src, out / "a.mask.tif", write=WriteOptions(probs=True, overlay=True))
    assert files(out) == []


def rgbn_checkpoint(tmp_path) -> Path:
    model = tiny_model(in_channels=4)
    ckpt = from_model(model, "ladder-dn121", CLASSES)
    ckpt.normalization.mean, ckpt.normalization.std = [0.0] * 4, [1.0] * 4
    return save_checkpoint(ckpt, tmp_path / "rgbn.pt")


@pytest.mark.parametrize("case,message", [
    ("missing", "input not found"),
    ("empty_dir", "no images in this folder"),
    ("text_tif", "not a readable raster"),
    ("zero_bytes", "empty file"),
    ("unwritable_out", "cannot write to output folder"),
    ("wrong_bands", "the model takes 4"),
    ("bad_checkpoint", "not a readable bigseg checkpoint"),
    ("bad_option", "--overlap must be in"),
])
def test_bad_inputs_give_one_clear_line_and_leave_nothing(tmp_path, tiny_checkpoint, capsys, case, message):
    src = write_geotiff(tmp_path / "ok.tif", 64, 64)
    model, out, args = tiny_checkpoint, tmp_path / "o", []
    if case == "missing":
        src = tmp_path / "nope.tif"
    elif case == "empty_dir":
        src = tmp_path / "empty"
        src.mkdir()
    elif case == "text_tif":
        src = tmp_path / "text.tif"
        src.write_text("hello")
    elif case == "zero_bytes":
        src = tmp_path / "zero.tif"
        src.write_bytes(b"")
    elif case == "unwritable_out":
        (tmp_path / "afile").write_text("x")
        out = tmp_path / "afile" / "o"
    elif case == "wrong_bands":
        model = rgbn_checkpoint(tmp_path)
    elif case == "bad_checkpoint":
        model = tmp_path / "bad.pt"
        model.write_bytes(b"garbage")
    elif case == "bad_option":
        args = ["--overlap", "500"]
    code, stdout, err = run_cli(capsys, "predict", src, "-m", model, "-o", out, *FAST, *args)
    assert code == 1
    lines = [l for l in err.splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: ") and message in lines[0], err
    assert not out.exists() or files(out) == []


def test_output_names_that_would_lose_data_are_refused(tmp_path, tiny_checkpoint, capsys):
    src = write_geotiff(tmp_path / "a.tif", 64, 64)
    for out, message in ((tmp_path / "a.png", "use a .tif name"), (src, "is the input itself")):
        code, _, err = run_cli(capsys, "predict", src, "-m", tiny_checkpoint, "-o", out, "--overwrite", *FAST)
        assert code == 1 and message in err
    assert files(tmp_path) == ["a.tif", "tiny.pt"]


def test_multiscale_and_flip_average_probabilities(tiny_checkpoint, tmp_path, capsys):
    import torch
    import torch.nn.functional as F

    ckpt = load_checkpoint(tiny_checkpoint)
    image = np.random.default_rng(4).uniform(0, 255, (3, 96, 128)).astype(np.float32)
    seg = Segmenter(ckpt, "cpu", "fp32", tile=256, scales=(0.5, 1.0), flip=True)
    probs = seg.scores(image)
    assert np.allclose(probs.sum(0), 1, atol=1e-5)
    model = ckpt.build_model()
    x = (torch.from_numpy(image)[None] - seg._mean) / seg._std
    expected = 0
    with torch.no_grad():
        for xs in (F.interpolate(x, (48, 64), mode="bilinear", align_corners=False), x):
            for mirror in (False, True):
                y = model(xs.flip(-1) if mirror else xs)
                y = y.flip(-1) if mirror else y
                expected = expected + F.interpolate(y, (96, 128), mode="bilinear", align_corners=False).softmax(1)
    np.testing.assert_allclose(probs, (expected / 4)[0].numpy(), atol=1e-5)
    src = write_geotiff(tmp_path / "ms.tif", 150, 130)
    code, _, err = run_cli(capsys, "predict", src, "-m", tiny_checkpoint, "-o", tmp_path / "o", "--scales",
                           "0.75,1,1.25", "--flip", "--probs", *FAST)
    assert code == 0, err
    with rasterio.open(tmp_path / "o" / "ms.probs.tif") as p:
        assert np.abs(p.read().astype(int).sum(0) - 255).max() <= 2


@pytest.mark.parametrize("backend", ["lattice", "window"])
def test_predict_with_dense_crf_writes_probabilities(tmp_path, tiny_checkpoint, capsys, backend):
    src = write_geotiff(tmp_path / "c.tif", 90, 70)
    code, _, err = run_cli(capsys, "predict", src, "-m", tiny_checkpoint, "-o", tmp_path / "o", "--crf", backend,
                           "--crf-params", "iterations=2", "--probs", *FAST)
    assert code == 0, err
    with rasterio.open(tmp_path / "o" / "c.probs.tif") as p, rasterio.open(tmp_path / "o" / "c.mask.tif") as m:
        probs, mask = p.read().astype(int), m.read(1)
    assert np.abs(probs.sum(0) - 255).max() <= 2 and (probs.argmax(0) == mask).mean() > 0.99
