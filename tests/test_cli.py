"""The command line: the installed console script (help, version, models, python -m) and `bigseg predict`
end to end (geospatial outputs, nodata, batch semantics, atomic writes, bad inputs)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import rasterio

from bigseg.checkpoint import from_model, load_checkpoint, save_checkpoint
from tests.cli_helpers import run_cli
from tests.conftest import CLASSES, tiny_model, write_geotiff
import bigseg


# --- The installed console script, run as a real subprocess: help, version, models, python -m.


ENV = {**os.environ, "COLUMNS": "200", "NO_COLOR": "1"}


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(args, capture_output=True, text=True, env=ENV, timeout=120)


def test_version():
    r = run("bigseg", "--version")
    assert r.returncode == 0 and r.stdout.strip() == f"bigseg {bigseg.__version__}"


@pytest.mark.parametrize("args", [("bigseg", "--help"), (sys.executable, "-m", "bigseg", "--help")])
def test_help_lists_the_commands(args):
    r = run(*args)
    assert r.returncode == 0
    for command in ("predict", "models", "--install-completion"):
        assert command in r.stdout


def test_predict_help_documents_the_options():
    r = run("bigseg", "predict", "--help")
    assert r.returncode == 0
    for option in ("--model", "--out", "--tile", "--overlap", "--batch-size", "--device", "--precision",
                   "--bands", "--probs", "--overlay", "--cog", "--json", "--recursive", "--overwrite"):
        assert option in r.stdout, option


def test_models_table_lists_the_ladders_with_published_sizes():
    r = run("bigseg", "models")
    assert r.returncode == 0, r.stderr
    assert "ladder-dn121" in r.stdout and "ladder-dn169" in r.stdout and "ladder-dn161" in r.stdout
    assert "10.31 M" in r.stdout and "16.34 M" in r.stdout and "31.24 M" in r.stdout
    from bigseg.catalogue import ARCHITECTURES

    names = [line.split()[0] for line in r.stdout.splitlines() if line.startswith("  ") and not line.startswith("   ")]
    assert set(ARCHITECTURES) <= set(names), "every architecture's name stands apart from its figures"


def test_user_mistake_is_one_line_without_traceback(tmp_path):
    r = run("bigseg", "predict", str(tmp_path / "missing.tif"), "--model", str(tmp_path / "none.pt"))
    assert r.returncode == 1
    assert r.stderr.strip().startswith("Error: ") and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_a_cli_run_in_a_test_leaves_no_signal_handler_behind(capsys):
    """The suite's own fixture puts back what the CLI installed: pytest keeps the handlers it had,
    so `timeout 600 python -m pytest` stops the suite as it should."""
    import signal

    from tests.cli_helpers import run_cli

    before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    run_cli(capsys, "predict", "no-such-file.tif")  # the CLI starts, installs its handlers, fails
    installed = {s: signal.getsignal(s) for s in before}
    assert installed != before, "the CLI installs its stop handlers (else this test shows nothing)"


def test_the_handlers_of_the_test_before_are_gone():
    import signal

    assert signal.getsignal(signal.SIGTERM) in (signal.SIG_DFL, None) or \
        getattr(signal.getsignal(signal.SIGTERM), "__module__", "") != "bigseg.runtime"


# --- `bigseg predict` end to end: geospatial outputs, nodata, batch semantics, atomic writes, bad inputs.


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


def crafted_png(width: int, height: int) -> bytes:
    """A 68-byte PNG whose header claims `width` x `height` pixels (a decompression bomb's header)."""
    import struct
    import zlib

    chunk = lambda kind, data: (struct.pack(">I", len(data)) + kind + data
                                + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\x00" * 10)) + chunk(b"IEND", b""))


def test_a_header_claiming_ten_gigapixels_is_one_line_and_the_batch_goes_on(tmp_path, tiny_checkpoint, capsys):
    import cv2

    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "bomb.png").write_bytes(crafted_png(100000, 100000))
    cv2.imwrite(str(folder / "good.png"), np.full((64, 80, 3), 120, np.uint8))
    code, _, err = run_cli(capsys, "predict", folder / "bomb.png", "-o", tmp_path / "one", "-m", tiny_checkpoint, *FAST)
    assert code == 1 and "Traceback" not in err and err.count("Error:") == 1 and "bomb.png" in err, err
    # a dry run decodes nothing: it plans what the header claims, read in windows by GDAL, and says so
    code, out, err = run_cli(capsys, "predict", folder / "bomb.png", "--dry-run", "--json", "-m", tiny_checkpoint, *FAST)
    plan = json.loads(out)[0]
    assert code == 0 and "Traceback" not in err and plan["reader"] == "GdalReader"
    assert plan["width"] == 100000 and any("over OpenCV's limit" in n for n in plan["notes"])
    code, out, err = run_cli(capsys, "predict", folder, "-m", tiny_checkpoint, "-o", tmp_path / "out", "--json", *FAST)
    assert code == 1 and err.count("Error:") == 1 and "Traceback" not in err
    summary = json.loads(out)
    assert [Path(d["input"]).name for d in summary["done"]] == ["good.png"]
    assert [Path(f["input"]).name for f in summary["failed"]] == ["bomb.png"]
    assert (tmp_path / "out" / "good.mask.png").is_file()


def test_any_error_a_file_raises_fails_that_file_alone(tmp_path, tiny_checkpoint, capsys, monkeypatch):
    """A library's own exception on a strange file (not a BigsegError) is one line too."""
    import cv2

    from bigseg.run import batch

    for name in ("a", "b", "c"):
        cv2.imwrite(str(tmp_path / f"{name}.png"), np.full((40, 50, 3), 100, np.uint8))
    real = batch.predict_file

    def strange(predictor, src, dst, options, say):
        if src.name == "b.png":
            raise ZeroDivisionError("a codec divided by zero")
        return real(predictor, src, dst, options, say)

    monkeypatch.setattr(batch, "predict_file", strange)
    code, out, err = run_cli(capsys, "predict", tmp_path / "a.png", tmp_path / "b.png", tmp_path / "c.png", "-m",
                             tiny_checkpoint, "-o", tmp_path / "out", "--json", *FAST)
    summary = json.loads(out)
    assert code == 1 and len(summary["done"]) == 2 and len(summary["failed"]) == 1
    assert "Error: " in err and "b.png: a codec divided by zero (ZeroDivisionError)" in err and "Traceback" not in err


def test_globs_and_single_files_never_segment_bigsegs_own_outputs(tmp_path, tiny_checkpoint, capsys, monkeypatch):
    src = write_geotiff(tmp_path / "RGB.byte.tif", 96, 80)
    monkeypatch.chdir(tmp_path)
    assert run_cli(capsys, "predict", "RGB.byte.tif", "-m", tiny_checkpoint, "--probs", *FAST)[0] == 0
    (tmp_path / "renamed.tif").write_bytes((tmp_path / "RGB.byte.mask.tif").read_bytes())  # found by its tag
    (tmp_path / ".hidden.tif").write_bytes(src.read_bytes())
    before = files(tmp_path)
    for args in (["*.tif"], ["*.tif", "--overwrite"], ["RGB.byte.mask.tif"]):
        code, out, err = run_cli(capsys, "predict", *args, "-m", tiny_checkpoint, "--json", *FAST)
        summary = json.loads(out)
        ignored = sorted(Path(i["input"]).name for i in summary["ignored"])
        assert code == 0, err
        assert set(ignored) <= {"RGB.byte.mask.tif", "RGB.byte.probs.tif", "renamed.tif"} and ignored
        assert "skipped, a mask bigseg wrote" in err or "skipped, probabilities bigseg wrote" in err
    assert files(tmp_path) == before  # no RGB.byte.mask.mask.tif, no renamed.mask.tif
    # hidden files in a folder are passed over quietly, not failures
    code, out, err = run_cli(capsys, "predict", tmp_path, "-m", tiny_checkpoint, "-o", tmp_path / "o", "--json", *FAST)
    summary = json.loads(out)
    assert code == 0 and [Path(d["input"]).name for d in summary["done"]] == ["RGB.byte.tif"]
    assert not summary["failed"] and ".hidden" not in err


def test_dry_run_names_the_weights_and_warns_of_a_plan_beyond_the_machine(tmp_path, capsys):
    import os

    src = write_geotiff(tmp_path / "big.tif", 9000, 9000, empty=True, nodata=0, SPARSE_OK=True)
    code, out, err = run_cli(capsys, "predict", src, "--dry-run", "--json", "-m", "ladder-dn121", "--tile", "9000",
                             "--device", "cpu")
    assert code == 0, err
    plan = json.loads(out)[0]
    assert plan["model"].startswith("ladder-dn121 -> ladder-dn121-camvid (") and "sha256" in plan["model"]
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2 ** 20
    assert plan["memory_mib"]["host"] > ram
    assert any("this machine has" in n for n in plan["notes"])


def test_the_progress_bar_keeps_a_bar_and_the_time_left_at_80_columns_and_counts_only_this_runs_speed():
    import io
    import time

    from rich.console import Console

    from bigseg.cli.render import TileProgress

    progress = TileProgress(console=Console(file=io.StringIO(), width=80, force_terminal=True, color_system=None))
    progress.start("yb_z21_epsg3857_jpeg_mask_and_then_some.tif", 1024 * 1024)
    progress.tile(100, 140)  # a resumed file: 99 tiles were done before this run
    time.sleep(0.05)
    progress.tile(101, 140)
    shown = io.StringIO()
    Console(file=shown, width=80, force_terminal=True, color_system=None).print(
        progress.progress.make_tasks_table(progress.progress.tasks))
    line = shown.getvalue().splitlines()[0]
    assert line.count("━") + line.count("╸") + line.count(" ") >= 20 and "…" in line[:26]  # a name cut to fit
    assert line.rstrip().endswith(tuple(f"{m}:{s:02d}" for m in range(100) for s in range(60)))  # time left whole
    rate = float(line.split(" MP/s")[0].split()[-1])
    assert rate < 2 * 1.05 / 0.05  # two tiles in this run's time, not 101


def test_help_shows_inputs_as_a_list_and_band_errors_name_the_option(tmp_path, tiny_checkpoint, capsys):
    code, out, _ = run_cli(capsys, "predict", "--help")
    assert "{INPUT}..." in out and "list[str]" not in out
    src = write_geotiff(tmp_path / "a.tif", 64, 64)
    code, _, err = run_cli(capsys, "predict", src, "-m", tiny_checkpoint, "--bands", "1,2", "-o", tmp_path / "o", *FAST)
    assert code == 1 and "a.tif: --bands chooses 2 band(s) but the model takes 3" in err, err
    code, _, err = run_cli(capsys, "predict", src, "-m", tiny_checkpoint, "--bands", "1,2,5", "-o", tmp_path / "o",
                           *FAST)
    assert code == 1 and "--bands asks for band 5 but a.tif has 3" in err, err


def test_a_folder_of_fifty_mixed_files_fails_each_broken_one_alone_and_counts_them(tmp_path, tiny_checkpoint, capsys):
    import cv2

    folder = tmp_path / "mixed"
    folder.mkdir()
    rng = np.random.default_rng(0)
    good = []
    for i in range(40):
        image = rng.integers(0, 255, (40 + i, 50, 3)).astype(np.uint8)
        name = f"good{i:02d}" + (".png", ".jpg", ".tif")[i % 3]
        if name.endswith(".tif"):
            write_geotiff(folder / name, 50, 40 + i, data=image.transpose(2, 0, 1))
        else:
            cv2.imwrite(str(folder / name), image)
        good.append(name)
    ok, jpeg = cv2.imencode(".jpg", rng.integers(0, 255, (64, 64, 3)).astype(np.uint8))
    broken = {"bomb.png": crafted_png(100000, 100000), "bomb2.png": crafted_png(70000, 70000), "empty.png": b"",
              "empty.tif": b"", "truncated.jpg": jpeg.tobytes()[:200], "text.png": b"not an image at all\n",
              "text.tif": b"II*\x00 not really a tiff", "garbage.jpg": bytes(rng.integers(0, 255, 500, dtype=np.uint8)),
              "half.tif": (folder / "good02.tif").read_bytes()[:300], "zeros.png": bytes(64)}
    for name, data in broken.items():
        (folder / name).write_bytes(data)
    (folder / ".DS_Store.png").write_bytes(b"hidden")  # a hidden file: passed over, not a failure
    code, out, err = run_cli(capsys, "predict", folder, "-m", tiny_checkpoint, "-o", tmp_path / "out", "--json", *FAST)
    summary = json.loads(out)
    assert code == 1 and "Traceback" not in err
    assert sorted(Path(d["input"]).name for d in summary["done"]) == sorted(good)
    assert sorted(Path(f["input"]).name for f in summary["failed"]) == sorted(broken)
    errors = [line for line in err.splitlines() if line.startswith("Error:")]
    assert len(errors) == len(broken) and all(any(name in line for name in broken) for line in errors)


def test_a_named_engine_that_cannot_export_is_an_error_while_auto_falls_back_with_one_note(
        tmp_path, tiny_checkpoint, capsys, monkeypatch):
    """`--engine openvino` whose export fails: one Error line per file, exit 1, no torch run behind
    the user's back; `auto` runs torch and says so once, in --json too."""
    import cv2

    from bigseg.infer.engines import exported

    for name in ("a", "b"):
        cv2.imwrite(str(tmp_path / f"{name}.png"), np.full((40, 50, 3), 100, np.uint8))
    tries = []

    def failing(*args):
        tries.append(args)
        raise RuntimeError("forced export failure")

    monkeypatch.setattr(exported, "export", failing)
    monkeypatch.setattr(exported, "AUTO_EXPORT_AFTER_S", 0.0)
    inputs = [tmp_path / "a.png", tmp_path / "b.png"]
    code, out, err = run_cli(capsys, "predict", *inputs, "-m", tiny_checkpoint, "-o", tmp_path / "named",
                             "--engine", "openvino", "--json", *FAST)
    summary = json.loads(out)
    errors = [line for line in err.splitlines() if line.startswith("Error:")]
    assert code == 1 and not summary["done"] and len(summary["failed"]) == 2 and "Traceback" not in err
    assert all("cannot be exported for OpenVINO" in line and "--engine torch" in line for line in errors)
    assert len(tries) == 1  # the second file knows the first one's failure
    assert not (tmp_path / "named").exists() or not list((tmp_path / "named").glob("*.mask.png"))

    monkeypatch.setenv("BIGSEG_CACHE", str(tmp_path / "fresh-cache"))
    code, out, err = run_cli(capsys, "predict", *inputs, "-m", tiny_checkpoint, "-o", tmp_path / "auto",
                             "--engine", "auto", "--json", *FAST)
    summary = json.loads(out)
    said = [n for r in summary["done"] for n in r["notes"] if "cannot be exported" in n]
    assert code == 0 and len(summary["done"]) == 2 and len(said) == 1
    assert err.count("cannot be exported") <= 1


def test_an_input_far_from_the_models_imagery_is_warned_of_once(tmp_path, tiny_checkpoint, capsys):
    """A 1-band uint16 0.5 m scene through a model of 8-bit RGB at 2 m: read at 2 m with one note and
    two warnings, each once; with --resolution native, three warnings."""
    from rasterio.transform import from_origin

    ckpt = load_checkpoint(tiny_checkpoint)
    ckpt.input = {"bands": [1, 2, 3], "value_range": None, "pixel_size": [2.0, 2.0], "units": "metre",
                  "eight_bit": True}
    model = save_checkpoint(ckpt, tmp_path / "rgb8.pt")
    data = np.random.default_rng(0).integers(0, 4000, (1, 90, 120)).astype(np.uint16)
    src = tmp_path / "scene.tif"
    with rasterio.open(src, "w", driver="GTiff", width=120, height=90, count=1, dtype="uint16", crs="EPSG:32640",
                       transform=from_origin(300000, 2770000, 0.5, 0.5)) as ds:
        ds.write(data)
    code, _, err = run_cli(capsys, "predict", src, "-m", model, "-o", tmp_path / "out", *FAST)
    warnings = [line for line in err.splitlines() if line.startswith("warning: ")]
    assert code == 0 and len(warnings) == 2 and "1 band" in warnings[0] and "uint16" in warnings[1], err
    assert err.count("read at the model's 2 metre pixels, resampled from the input's 0.5 metre") == 1
    code, _, err = run_cli(capsys, "predict", src, "-m", model, "-o", tmp_path / "native", *FAST,
                           "--resolution", "native")
    warnings = [line for line in err.splitlines() if line.startswith("warning: ")]
    assert code == 0 and len(warnings) == 3, err
    assert "1 band" in warnings[0] and "uint16" in warnings[1] and "0.5 metre" in warnings[2]
    assert "single band repeated" not in err
    ckpt.input = {}  # a model of 8-bit photographs: an 8-bit RGB image is what it knows
    plain = save_checkpoint(ckpt, tmp_path / "photo.pt")
    rgb = write_geotiff(tmp_path / "rgb.tif", 120, 90)
    code, _, err = run_cli(capsys, "predict", rgb, "-m", plain, "-o", tmp_path / "out2", *FAST)
    assert code == 0 and "warning" not in err


@pytest.mark.skipif(not hasattr(__import__("os"), "fork"), reason="POSIX file size limits")
def test_a_full_disk_is_one_line_that_names_the_cause_and_leaves_no_file(tmp_path, tiny_checkpoint):
    """Simulated with a file size limit (ulimit -f): no raw libtiff lines, bigseg's own line says
    why, and no half-written output is left."""
    import resource
    import subprocess
    import sys

    src = write_geotiff(tmp_path / "a.tif", 700, 600, seed=1)
    out = tmp_path / "out"
    limit = lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (16 * 1024, resource.RLIM_INFINITY))
    done = subprocess.run([sys.executable, "-m", "bigseg", "predict", str(src), "-m", str(tiny_checkpoint), "-o",
                           str(out), "--probs", *FAST], capture_output=True, text=True, preexec_fn=limit,
                          env={**__import__("os").environ, "BIGSEG_ENGINE": "torch"}, timeout=300)
    lines = [line for line in done.stderr.splitlines() if line.strip() and not line.startswith("note:")]
    assert done.returncode == 1 and len(lines) == 1, done.stderr
    assert lines[0].startswith("Error: ") and "file size limit" in lines[0] and "ulimit -f" in lines[0]
    assert "_tiff" not in done.stderr and "TIFF" not in done.stderr
    assert not out.exists() or not [p for p in out.iterdir() if p.suffix == ".tif" or ".partial" in p.name]
