"""File jobs and batches (`bigseg.run`): the journaled file job and its resume, the dry-run plan,
and a raster cut into parts under torchrun."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import rasterio
import torch

from bigseg.atomic import partial_path
from bigseg.checkpoint import load_checkpoint
from bigseg.infer.engines.torch import TorchEngine
from bigseg.infer.predictor import Predictor
from bigseg.io.outputs import WriteOptions, part_path
from bigseg.run.file_job import JobOptions, predict_file
from bigseg.run.journal import journal_path, read_journal
from bigseg.run.plan import activation_bytes
from bigseg.run.shards import part_rows
from bigseg.tiling.geometry import TileGrid
from tests.cli_helpers import run_cli
from tests.conftest import interrupt_after, write_geotiff


# --- One file job: file output equals the in-memory API, nodata forms kept, interrupted runs leave nothing
# that looks finished, killed runs resume bit for bit, damaged partials start over.


def files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def predict_cmd(src, dst, ckpt, *extra):
    return [sys.executable, "-m", "bigseg", "predict", str(src), "--model", str(ckpt), "-o", str(dst),
            "--device", "cpu", "--tile", "64", "--overlap", "16", "--batch-size", "2", *extra]


def read(path):
    with rasterio.open(path) as ds:
        return ds.read(), ds.transform, ds.crs, ds.read_masks(1)


def test_file_output_equals_the_in_memory_api(tmp_path, tiny_checkpoint):
    src = write_geotiff(tmp_path / "a.tif", 333, 257)
    seg = Predictor(load_checkpoint(tiny_checkpoint), "cpu", "fp32", tile=128, overlap=32, batch_size=3)
    predict_file(seg, src, tmp_path / "a.mask.tif")
    with rasterio.open(src) as ds:
        image = ds.read()
    with rasterio.open(tmp_path / "a.mask.tif") as ds:
        assert np.array_equal(ds.read(1), seg.segment(image))


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
    seg = Predictor(load_checkpoint(tiny_checkpoint), "cpu", tile=64, overlap=16)
    predict_file(seg, src, tmp_path / "f.mask.tif")
    with rasterio.open(tmp_path / "f.mask.tif") as ds:
        out = ds.read(1)
    assert (out[hole] == 255).all()
    outside = np.ones_like(out, bool)
    outside[hole] = False
    assert (out[outside] < 3).all()


def test_an_interrupted_run_leaves_no_output(tmp_path, tiny_checkpoint, monkeypatch):
    src = write_geotiff(tmp_path / "a.tif", 400, 400)
    seg = Predictor(load_checkpoint(tiny_checkpoint), "cpu", tile=64, overlap=16, batch_size=2)
    interrupt_after(seg, 6)
    out = tmp_path / "o"
    out.mkdir()
    with pytest.raises(KeyboardInterrupt):
        predict_file(seg, src, out / "a.mask.tif", options=JobOptions(write=WriteOptions(probs=True, overlay=True)))
    assert files(out) == []


def one_thread_here(capsys, *args) -> None:
    """`bigseg predict` in this process on one thread, as the subprocesses it is compared with
    (OMP_NUM_THREADS=1) compute: the reference run, without starting another Python."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        code, _, err = run_cli(capsys, "predict", *args)
    finally:
        torch.set_num_threads(threads)
    assert code == 0, err


def test_sigkill_then_rerun_equals_uninterrupted_bit_for_bit(tmp_path, tiny_checkpoint, capsys):
    src = write_geotiff(tmp_path / "big.tif", 900, 1400, nodata=0)
    env = {**os.environ, "BIGSEG_JOURNAL_SECONDS": "0", "OMP_NUM_THREADS": "1"}
    whole = tmp_path / "whole.tif"
    one_thread_here(capsys, *predict_cmd(src, whole, tiny_checkpoint, "--probs")[4:])

    dst = tmp_path / "resumed.tif"
    proc = subprocess.Popen(predict_cmd(src, dst, tiny_checkpoint, "--probs"), env=env)
    deadline = time.time() + 120
    while time.time() < deadline:
        j = read_journal(dst)
        if j is not None and j["rows_done"] >= 300:
            break
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    j = read_journal(dst)
    assert j is not None and 300 <= j["rows_done"] < 1400, j
    assert not dst.exists()  # nothing that looks complete

    result = subprocess.run(predict_cmd(src, dst, tiny_checkpoint, "--probs"), env=env, capture_output=True,
                            text=True)
    assert result.returncode == 0, result.stderr
    assert "resuming the interrupted run at row" in result.stderr
    assert not journal_path(dst).exists() and not list(tmp_path.glob(".*partial*"))
    for a, b in ((whole, dst), (tmp_path / "whole.probs.tif", tmp_path / "resumed.probs.tif")):
        da, ta, ca, ma = read(a)
        db, tb, cb, mb = read(b)
        assert np.array_equal(da, db) and np.array_equal(ma, mb) and ta == tb and ca == cb


def test_changed_settings_start_over_and_interrupt_keeps_journaled_rows(tmp_path, tiny_checkpoint, capsys):
    # taller than one 512-row block: the journal records whole block rows
    src = write_geotiff(tmp_path / "a.tif", 300, 1200)
    seg = Predictor(load_checkpoint(tiny_checkpoint), "cpu", tile=64, overlap=16, batch_size=2)
    interrupt_after(seg, 60)
    dst = tmp_path / "a.mask.tif"
    with pytest.raises(KeyboardInterrupt):
        predict_file(seg, src, dst, options=JobOptions(write=WriteOptions(overlay=True), journal_seconds=0))
    assert read_journal(dst)["rows_done"] > 0 and not dst.exists()
    # a different overlap: the journal does not apply
    code, _, err = run_cli(capsys, "predict", src, "--model", tiny_checkpoint, "-o", dst, "--device", "cpu",
                           "--tile", "64", "--overlap", "24", "--overlay")
    assert code == 0, err
    assert "changed since the interrupted run: starting over" in err
    assert not journal_path(dst).exists() and dst.exists() and (tmp_path / "a.overlay.png").exists()


def test_resumed_overlay_equals_uninterrupted(tmp_path, tiny_checkpoint):
    import cv2
    src = write_geotiff(tmp_path / "a.tif", 300, 1200)
    ckpt = load_checkpoint(tiny_checkpoint)
    predict_file(Predictor(ckpt, "cpu", tile=64, overlap=16), src, tmp_path / "w.tif", options=JobOptions(write=WriteOptions(overlay=True)))
    seg = Predictor(ckpt, "cpu", tile=64, overlap=16)
    interrupt_after(seg, 30)
    with pytest.raises(KeyboardInterrupt):
        predict_file(seg, src, tmp_path / "r.tif", options=JobOptions(write=WriteOptions(overlay=True), journal_seconds=0))
    result = predict_file(Predictor(ckpt, "cpu", tile=64, overlap=16), src, tmp_path / "r.tif",
                                                                      options=JobOptions(write=WriteOptions(overlay=True)))
    assert any("resuming" in n for n in result.notes)
    assert np.array_equal(cv2.imread(str(tmp_path / "w.overlay.png")), cv2.imread(str(tmp_path / "r.overlay.png")))
    assert np.array_equal(read(tmp_path / "w.tif")[0], read(tmp_path / "r.tif")[0])


def test_a_damaged_partial_output_starts_over_instead_of_failing(tmp_path, tiny_checkpoint):
    src = write_geotiff(tmp_path / "a.tif", 200, 1300)
    ckpt = load_checkpoint(tiny_checkpoint)
    whole = tmp_path / "whole.tif"
    predict_file(Predictor(ckpt, "cpu", tile=64, overlap=16), src, whole)
    seg = Predictor(ckpt, "cpu", tile=64, overlap=16)
    interrupt_after(seg, 25)
    dst = tmp_path / "r.tif"
    with pytest.raises(KeyboardInterrupt):
        predict_file(seg, src, dst, JobOptions(journal_seconds=0))
    assert read_journal(dst)["rows_done"] in (512, 1024)
    partial = partial_path(dst)
    raw = partial.read_bytes()
    # blocks are written once, so a crash can only cut what follows the last sync: the TIFF
    # directory that libtiff appends at the end when the file is closed
    partial.write_bytes(raw[: len(raw) - 200])
    result = predict_file(Predictor(ckpt, "cpu", tile=64, overlap=16), src, dst)
    assert any("unusable" in n and "starting over" in n for n in result.notes), result.notes
    with rasterio.open(whole) as a, rasterio.open(dst) as b:
        assert np.array_equal(a.read(), b.read())


def test_gdal_threads_change_nothing_in_the_outputs(tmp_path, tiny_checkpoint):
    src = write_geotiff(tmp_path / "a.tif", 700, 1100, nodata=0, compress="deflate")
    ckpt = load_checkpoint(tiny_checkpoint)
    for threads in (1, 3):
        seg = Predictor(ckpt, "cpu", tile=128, overlap=32)
        predict_file(seg, src, tmp_path / f"t{threads}.tif", options=JobOptions(write=WriteOptions(probs=True), io_threads=threads))
    for name in ("t{}.tif", "t{}.probs.tif"):
        with rasterio.open(tmp_path / name.format(1)) as a, rasterio.open(tmp_path / name.format(3)) as b:
            assert np.array_equal(a.read(), b.read()) and np.array_equal(a.read_masks(1), b.read_masks(1))


@pytest.mark.parametrize("signum, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)], ids=["ctrl-c", "sigterm"])
def test_ctrl_c_says_what_was_kept_and_the_rerun_says_it_resumes_at_once(tmp_path, tiny_checkpoint, signum, code):
    # tall enough that the signal, sent once the first block row is journaled, lands before the end
    src = write_geotiff(tmp_path / "big.tif", 600, 3600, nodata=0)
    env = {**os.environ, "BIGSEG_JOURNAL_SECONDS": "0"}
    dst = tmp_path / "out.tif"
    proc = subprocess.Popen(predict_cmd(src, dst, tiny_checkpoint), env=env, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and (read_journal(dst) or {}).get("rows_done", 0) < 512:
        time.sleep(0.005)
    proc.send_signal(signum)
    err = proc.communicate(timeout=60)[1]
    kept = read_journal(dst)["rows_done"]
    assert proc.returncode == code, err
    assert f"interrupted: {kept} of 3600 rows of out.tif kept; run the same command to resume" in err
    assert "Traceback" not in err
    done = subprocess.run(predict_cmd(src, dst, tiny_checkpoint), env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    lines = done.stderr.splitlines()
    resumed = next(i for i, line in enumerate(lines) if f"resuming the interrupted run at row {kept}" in line)
    finished = next(i for i, line in enumerate(lines) if "-> " in line)
    assert resumed < finished  # said when it starts, not only at the end


def test_progress_lines_appear_without_a_terminal(tmp_path, tiny_checkpoint, capsys, monkeypatch):
    from bigseg.cli import render

    monkeypatch.setattr(render, "PLAIN_EVERY_SECONDS", 0.0)
    src = write_geotiff(tmp_path / "a.tif", 600, 400)
    code, _, err = run_cli(capsys, "predict", src, "--model", tiny_checkpoint, "-o", tmp_path / "a.mask.tif",
                           "--device", "cpu", "--tile", "64", "--overlap", "16")
    assert code == 0, err
    progress = [line for line in err.splitlines() if line.startswith("a.tif: ") and "tiles (" in line]
    assert len(progress) >= 5 and all("tiles/s" in line and "MP/s" in line and "left" in line for line in progress)


SPARSE_PROBE = """
import resource, sys, time
from pathlib import Path
from bigseg.checkpoint import load_checkpoint
from bigseg.infer.predictor import Predictor
from bigseg.run.file_job import predict_file
predictor = Predictor(load_checkpoint(sys.argv[1]), "cpu", tile=1024, overlap=256, batch_size=4)
tiles = []
real = predictor.engine.scores
predictor.engine.scores = lambda batch: (tiles.append(len(batch)), real(batch))[1]
start = time.perf_counter()
predict_file(predictor, Path(sys.argv[2]), Path(sys.argv[3]))
print(sum(tiles), round(time.perf_counter() - start, 2), int(next(l for l in open('/proc/self/status') if l.startswith('VmHWM')).split()[1]))
"""


def test_a_huge_mostly_nodata_raster_costs_what_its_valid_area_costs(tmp_path, tiny_checkpoint):
    """100000 x 100000 pixels, one 600 x 600 patch of data in a sparse GeoTIFF (nodata 0): the same
    model work and about the same memory as a 4096 x 4096 raster with that patch; the mask is
    sparse on disk, nodata everywhere but around the patch."""
    from rasterio.windows import Window as RWindow

    patch = np.random.default_rng(0).integers(1, 255, (3, 600, 600)).astype(np.uint8)
    runs = {}
    for side in (4096, 100_000):
        src = write_geotiff(tmp_path / f"s{side}.tif", side, side, nodata=0, data=None, SPARSE_OK=True,
                            BIGTIFF="YES", compress="deflate", empty=True)
        with rasterio.open(src, "r+") as ds:
            ds.write(patch, window=RWindow(2000, 3000, 600, 600))
        out = subprocess.run([sys.executable, "-c", SPARSE_PROBE, str(tiny_checkpoint), str(src), str(tmp_path / f"m{side}.tif")],
                             capture_output=True, text=True, timeout=600)
        assert out.returncode == 0, out.stderr[-3000:]
        runs[side] = [float(v) for v in out.stdout.split()[-3:]]
    (small_tiles, _, small_rss), (big_tiles, big_s, big_rss) = runs[4096], runs[100_000]
    assert big_tiles == small_tiles > 0            # only tiles with valid pixels reach the model
    assert big_rss < 1.3 * small_rss                # no accumulator or block row for nodata regions
    assert big_s < 120                              # 16900 tiles, all but a few never read
    big = tmp_path / "m100000.tif"
    assert big.stat().st_size < 5e6                  # nodata blocks are not written (sparse file)
    with rasterio.open(big) as ds:
        assert (ds.width, ds.height) == (100_000, 100_000)
        inside = ds.read(1, window=RWindow(2100, 3100, 400, 400))
        assert (inside < 3).all()
        for row, col in ((0, 0), (50_000, 50_000), (99_000, 99_000), (3000, 2700)):
            assert (ds.read(1, window=RWindow(col, row, 256, 256)) == 255).all()
        assert not ds.overviews(1)                  # mostly empty: no overviews to build from 10 GB of nodata


def test_areas_and_polygons_after_a_resume_inside_a_tile_equal_the_uninterrupted_runs(tmp_path, tiny_checkpoint):
    """The journal keeps whole 512-row blocks; tiles of 64 px at a stride of 48 cross them, so the
    resumed tiles start above the journaled row: those rows are counted once, not twice, and the
    polygons made from the rows of the mask as it is written are whole again."""
    import pyogrio.raw
    import shapely

    from bigseg.vector.features import VectorOptions

    src = write_geotiff(tmp_path / "a.tif", 300, 1200, nodata=0, seed=3)
    ckpt = load_checkpoint(tiny_checkpoint)
    options = lambda **kw: JobOptions(write=WriteOptions(areas=True, polygons=VectorOptions()), **kw)
    whole = predict_file(Predictor(ckpt, "cpu", tile=64, overlap=16), src, tmp_path / "w.tif", options=options())
    seg = Predictor(ckpt, "cpu", tile=64, overlap=16)
    interrupt_after(seg, 30)
    with pytest.raises(KeyboardInterrupt):
        predict_file(seg, src, tmp_path / "r.tif", options=options(journal_seconds=0))
    assert read_journal(tmp_path / "r.tif")["rows_done"] % 48  # the journaled row lies inside a tile
    resumed = predict_file(Predictor(ckpt, "cpu", tile=64, overlap=16), src, tmp_path / "r.tif", options=options())
    assert any("resuming" in n for n in resumed.notes)
    assert resumed.areas.pixels.tolist() == whole.areas.pixels.tolist()
    assert resumed.areas.pixels.sum() + resumed.areas.nodata_pixels == 300 * 1200
    assert resumed.areas.nodata_pixels == whole.areas.nodata_pixels
    np.testing.assert_allclose(resumed.areas.area_m2, whole.areas.area_m2, rtol=1e-12)
    (_, _, wkb_w, (cls_w, *_)), (_, _, wkb_r, (cls_r, *_)) = (
        pyogrio.raw.read(tmp_path / f"{n}.polygons.gpkg") for n in ("w", "r"))
    assert len(cls_w) > 10 and sorted(cls_w) == sorted(cls_r)
    w, r = shapely.from_wkb(wkb_w), shapely.from_wkb(wkb_r)
    assert sorted(shapely.area(w).round(6)) == sorted(shapely.area(r).round(6))
    assert shapely.union_all(w).symmetric_difference(shapely.union_all(r)).area == 0


# --- The dry run: a plan without running the model, its memory terms simulated or traced exactly; the seam
# report.


def test_dry_run_plans_without_predicting(tmp_path, tiny_checkpoint, capsys, monkeypatch):
    src = write_geotiff(tmp_path / "a.tif", 700, 500)
    monkeypatch.setattr(TorchEngine, "scores", lambda *a: pytest.fail("the model ran"))
    code, out, err = run_cli(capsys, "predict", src, "--model", tiny_checkpoint, "-o", tmp_path / "o.tif",
                             "--tile", "256", "--overlap", "64", "--device", "cpu", "--dry-run", "--json",
                             "--probs", "--cog")
    assert code == 0, err
    plan = json.loads(out)[0]
    grid = TileGrid(700, 500, 256, 64)
    assert (plan["width"], plan["height"], plan["tiles"], plan["overlap"]) == (700, 500, len(grid), 64)
    assert plan["batches"] == -(-len(grid) // 4) and plan["overlap_from"] == "--overlap"
    assert [o["format"] for o in plan["outputs"]] == ["COG", "COG"] and not plan["outputs"][0]["bigtiff"]
    m = plan["memory_mib"]
    assert m["gpu"] is None and m["host"] == pytest.approx(sum(v for k, v in m.items() if k not in ("host", "gpu")), abs=1)
    assert not (tmp_path / "o.tif").exists()
    code, out, err = run_cli(capsys, "predict", src, "--model", tiny_checkpoint, "--device", "cpu", "--dry-run")
    assert code == 0 and "tiles" in out and "memory" in out and "host" in out


def test_activation_trace_scales_with_batch_and_area(tiny_checkpoint):
    ckpt = load_checkpoint(tiny_checkpoint)
    one = activation_bytes(ckpt, 1, 128, 128)
    assert activation_bytes(ckpt, 2, 128, 128) == pytest.approx(2 * one, rel=0.05)
    assert activation_bytes(ckpt, 1, 256, 256) == pytest.approx(4 * one, rel=0.1)
    assert activation_bytes(ckpt, 1, 128, 128, torch.bfloat16) == pytest.approx(one / 2, rel=0.05)


def test_writer_rows_in_flight_are_simulated_exactly(tmp_path):
    from bigseg.io.writers import GeoTiffWriter
    from bigseg.run.plan import writer_rows
    from bigseg.tiling.stitch import Pipeline, stream_tiles

    for w, h, t, o in ((300, 1700, 256, 64), (1500, 2100, 1024, 256), (150, 900, 128, 32)):  # 2+ tile columns
        grid = TileGrid(w, h, t, o)
        writer = GeoTiffWriter(tmp_path / f"o{h}.tif", w, h, 1, None)
        peak = 0
        read = lambda win: (np.zeros((1, win.height, win.width), np.float32), np.ones((win.height, win.width), bool))
        for win, block, _ in stream_tiles(grid, read, Pipeline(lambda x: x, 1, np.zeros((1, 1, 1), np.float32), 2)):
            writer.write(win, block[0].astype(np.uint8))
            peak = max(peak, sum(b[0].shape[1] for b in writer._bands.values()))
        writer.abort()
        assert peak <= writer_rows(grid) <= peak + 512, (w, h, t, o, peak, writer_rows(grid))


def test_seam_report_counts_overlap_disagreement(tmp_path, tiny_checkpoint, capsys):
    import rasterio

    from bigseg.tiling.stitch import Pipeline, stream_tiles
    # scores that depend on the tile: two overlapping tiles disagree everywhere they overlap
    grid = TileGrid(100, 40, 64, 28)
    calls = {"n": 0}

    def predict(batch):
        calls["n"] += 1
        out = np.zeros((len(batch), 2, *batch.shape[-2:]), np.float32)
        out[:, calls["n"] % 2] = 1
        return out

    seams = {}
    read = lambda w: (np.zeros((1, w.height, w.width), np.float32), np.ones((w.height, w.width), bool))
    list(stream_tiles(grid, read, Pipeline(predict, 2, np.zeros((1, 1, 1), np.float32), 1), seams=seams))
    assert seams["compared"] > 0 and seams["disagreed"] == seams["compared"]
    seams = {}
    list(stream_tiles(grid, read, Pipeline(lambda b: np.ones((len(b), 2, *b.shape[-2:]), np.float32), 2,
                                           np.zeros((1, 1, 1), np.float32), 1), seams=seams))
    assert seams["compared"] > 0 and seams["disagreed"] == 0
    src = write_geotiff(tmp_path / "a.tif", 300, 200)
    code, out, err = run_cli(capsys, "predict", src, "--model", tiny_checkpoint, "-o", tmp_path / "m.tif",
                             "--tile", "64", "--device", "cpu", "--seams", "--json")
    assert code == 0, err
    report = json.loads(out)["done"][0]["seams"]
    assert 0 <= report["disagreed"] <= report["compared"] > 0
    with rasterio.open(tmp_path / "m.tif") as ds:
        assert float(ds.tags()["seam_disagreement"]) == report["rate"]


# --- predict under torchrun (gloo, 2 CPU processes): parts and files split across ranks, outputs equal to one
# process bit for bit, a dead rank's part redone on the rerun.


linux_only = pytest.mark.skipif(sys.platform != "linux", reason="torchrun tests run on Linux CI")


def torchrun(args, port, env=None, nproc=2, script=None):
    entry = [str(script)] if script else ["-m", "bigseg"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--master-port", str(port),
           *entry, "predict", *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})


def same_raster(a, b):
    with rasterio.open(a) as x, rasterio.open(b) as y:
        assert np.array_equal(x.read(), y.read()) and x.transform == y.transform and x.crs == y.crs
        assert np.array_equal(x.read_masks(1), y.read_masks(1))
        assert x.colormap(1) == y.colormap(1) if x.count == 1 else True


def test_part_rows_cut_at_tile_rows():
    starts = [0, 48, 96, 144, 192]
    assert part_rows(starts, 256, 2) == [(0, 96), (96, 256)]
    assert part_rows(starts, 256, 9) == [(0, 48), (48, 96), (96, 144), (144, 192), (192, 256)]
    assert part_rows(starts, 256, 1) == [(0, 256)]


@linux_only
def test_one_raster_split_across_ranks_equals_one_process(tmp_path, tiny_checkpoint, capsys):
    src = write_geotiff(tmp_path / "big.tif", 300, 420, nodata=0)
    common = ["--model", tiny_checkpoint, "--device", "cpu", "--tile", "64", "--overlap", "16", "--probs",
              "--overlay"]
    one_thread_here(capsys, src, "-o", tmp_path / "one.tif", *common)
    proc = torchrun([src, "-o", tmp_path / "two.tif", *common, "--json"], 29521)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout)
    assert len(report["done"]) == 1 and "2 parts" in report["done"][0]["notes"]
    same_raster(tmp_path / "one.tif", tmp_path / "two.tif")
    same_raster(tmp_path / "one.probs.tif", tmp_path / "two.probs.tif")
    import cv2
    assert np.array_equal(cv2.imread(str(tmp_path / "one.overlay.png")), cv2.imread(str(tmp_path / "two.overlay.png")))
    assert not list(tmp_path.glob(".*part*"))


@linux_only
def test_a_dead_rank_leaves_its_part_and_the_rerun_redoes_only_that(tmp_path, tiny_checkpoint, capsys):
    src = write_geotiff(tmp_path / "big.tif", 200, 300)
    common = ["--model", tiny_checkpoint, "--device", "cpu", "--tile", "64", "--overlap", "16"]
    one_thread_here(capsys, src, "-o", tmp_path / "one.tif", *common)
    # rank 1 dies (hard exit) before writing anything: torchrun fails the job, rank 0's part stays
    dying = tmp_path / "dying.py"
    dying.write_text(
        "import os, sys\n"
        "import bigseg.run.shards as s\n"
        "from bigseg.io.outputs import part_path\n"
        "real = s.predict_part\n"
        "def part(predictor, src, dst, options, p, n):\n"
        "    if p == 1:  # die once rank 0's part is committed\n"
        "        import time\n"
        "        while not part_path(dst, 0, n).exists():\n"
        "            time.sleep(0.01)\n"
        "        os._exit(3)\n"
        "    return real(predictor, src, dst, options, p, n)\n"
        "s.predict_part = part\n"
        "sys.argv = ['bigseg'] + sys.argv[1:]\n"
        "from bigseg.cli import main\n"
        "main()\n")
    proc = torchrun([src, "-o", tmp_path / "two.tif", *common], 29522, script=dying)
    assert proc.returncode != 0
    kept = part_path(tmp_path / "two.tif", 0, 2)
    assert kept.is_file() and not part_path(tmp_path / "two.tif", 1, 2).exists()
    assert not (tmp_path / "two.tif").exists()
    before = kept.stat().st_mtime_ns
    proc = torchrun([src, "-o", tmp_path / "two.tif", *common], 29523)
    assert proc.returncode == 0, proc.stderr[-3000:]
    same_raster(tmp_path / "one.tif", tmp_path / "two.tif")
    assert not kept.exists() and before  # assembled and cleaned up


@linux_only
def test_many_files_are_shared_round_robin(tmp_path, tiny_checkpoint, capsys):
    folder = tmp_path / "in"
    folder.mkdir()
    for i in range(3):
        write_geotiff(folder / f"f{i}.tif", 90, 70, seed=i)
    common = ["--model", tiny_checkpoint, "--device", "cpu", "--tile", "64", "--overlap", "16"]
    one_thread_here(capsys, folder, "-o", tmp_path / "one", *common)
    proc = torchrun([folder, "-o", tmp_path / "two", *common, "--json"], 29524)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert len(json.loads(proc.stdout)["done"]) == 3
    for i in range(3):
        same_raster(tmp_path / "one" / f"f{i}.mask.tif", tmp_path / "two" / f"f{i}.mask.tif")


def test_process_groups_wait_longer_than_torch_default(monkeypatch):
    """Ranks wait at barriers while one works alone (main-rank validation, a slow part): the group
    must not time out after torch's 30 (gloo) or 10 (NCCL) minutes."""
    from datetime import timedelta

    import torch.distributed as dist

    from bigseg import distributed

    seen = {}
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "init_process_group", lambda backend, **kw: seen.update(backend=backend, **kw))
    distributed.init(distributed.Rank(0, 2), "nccl")
    assert seen["backend"] == "nccl" and seen["timeout"] >= timedelta(days=1)
