"""`bigseg predict` end to end: geospatial outputs, nodata, batch semantics, atomic writes, bad inputs."""
import json
from pathlib import Path

import numpy as np
import pytest
import rasterio

from bigseg.checkpoint import from_model, load_checkpoint, save_checkpoint
from tests.cli_helpers import run_cli
from tests.conftest import CLASSES, tiny_model, write_geotiff

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
    assert files(tmp_path / "o") == ["big.mask.qml", "big.mask.tif", "big.mask.tif.aux.xml"]  # + class names for GIS










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
    assert files(tmp_path / "o") == ["a.mask.qml", "a.mask.tif", "a.mask.tif.aux.xml", "sub"]


def test_globs_expand(tmp_path, tiny_checkpoint, capsys):
    for name in ("x1.tif", "x2.tif", "y.tif"):
        write_geotiff(tmp_path / name, 64, 64)
    code, _, err = run_cli(capsys, "predict", str(tmp_path / "x*.tif"), "-m", tiny_checkpoint,
                           "-o", tmp_path / "o", *FAST)
    assert code == 0, err
    assert files(tmp_path / "o") == ["x1.mask.qml", "x1.mask.tif", "x1.mask.tif.aux.xml", "x2.mask.qml",
                                     "x2.mask.tif", "x2.mask.tif.aux.xml"]
    assert "2 done, 0 skipped, 0 failed" in err




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




@pytest.mark.parametrize("backend", ["lattice", "window"])
def test_predict_with_dense_crf_writes_probabilities(tmp_path, tiny_checkpoint, capsys, backend):
    src = write_geotiff(tmp_path / "c.tif", 90, 70)
    code, _, err = run_cli(capsys, "predict", src, "-m", tiny_checkpoint, "-o", tmp_path / "o", "--crf", backend,
                           "--crf-params", "iterations=2", "--probs", *FAST)
    assert code == 0, err
    with rasterio.open(tmp_path / "o" / "c.probs.tif") as p, rasterio.open(tmp_path / "o" / "c.mask.tif") as m:
        probs, mask = p.read().astype(int), m.read(1)
    assert np.abs(probs.sum(0) - 255).max() <= 2 and (probs.argmax(0) == mask).mean() > 0.99
