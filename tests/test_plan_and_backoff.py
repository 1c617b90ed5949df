"""--dry-run plans and memory estimates, out-of-memory back-off, overlap from the model, seams."""
import json

import numpy as np
import pytest
import torch

from bigseg.checkpoint import from_model, load_checkpoint, save_checkpoint
from bigseg.inference import Segmenter
from bigseg.models import create_model
from bigseg.models.receptive import default_overlap, effective_margin
from bigseg.plan import activation_bytes
from bigseg.tiling import StreamingStitcher, TileGrid, stitcher_peak_pixels
from tests.cli_helpers import run_cli
from tests.conftest import CLASSES, TINY_BY_ARCH, write_geotiff


def test_dry_run_plans_without_predicting(tmp_path, tiny_checkpoint, capsys, monkeypatch):
    src = write_geotiff(tmp_path / "a.tif", 700, 500)
    monkeypatch.setattr(Segmenter, "_tile_scores", lambda *a: pytest.fail("the model ran"))
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


def test_stitcher_peak_is_simulated_exactly():
    for w, h, t, o in ((1000, 700, 256, 64), (300, 90, 64, 16), (2000, 2000, 512, 128)):
        grid = TileGrid(w, h, t, o)
        s = StreamingStitcher(grid, 1)
        for win in grid:
            s.add(win, np.zeros((1, win.height, win.width), np.float32))
            list(s.pop_finished())
        assert s.peak_pixels == stitcher_peak_pixels(grid)


def test_activation_trace_scales_with_batch_and_area(tiny_checkpoint):
    ckpt = load_checkpoint(tiny_checkpoint)
    one = activation_bytes(ckpt, 1, 128, 128)
    assert activation_bytes(ckpt, 2, 128, 128) == pytest.approx(2 * one, rel=0.05)
    assert activation_bytes(ckpt, 1, 256, 256) == pytest.approx(4 * one, rel=0.1)
    assert activation_bytes(ckpt, 1, 128, 128, torch.bfloat16) == pytest.approx(one / 2, rel=0.05)


def oom_above(seg, limit_tiles: int = 1, limit_side: int = 10 ** 9):
    real = seg._tile_scores

    def guarded(batch):
        if len(batch) > limit_tiles or max(batch.shape[-2:]) > limit_side:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(batch)
    seg._tile_scores = guarded


def test_out_of_memory_halves_the_batch_with_the_same_output(tmp_path, tiny_checkpoint):
    import rasterio
    src = write_geotiff(tmp_path / "a.tif", 400, 300)
    ckpt = load_checkpoint(tiny_checkpoint)
    Segmenter(ckpt, "cpu", tile=64, overlap=16, batch_size=1).predict_file(src, tmp_path / "one.tif")
    seg = Segmenter(ckpt, "cpu", tile=64, overlap=16, batch_size=8)
    oom_above(seg, limit_tiles=2)
    result = seg.predict_file(src, tmp_path / "backoff.tif")
    assert seg._fitting_batch == 2
    assert [n for n in result.notes if "out of memory" in n] == [
        "out of memory with 8 tiles per batch: continuing with 4",
        "out of memory with 4 tiles per batch: continuing with 2"]
    with rasterio.open(tmp_path / "one.tif") as a, rasterio.open(tmp_path / "backoff.tif") as b:
        assert np.array_equal(a.read(), b.read())


def test_one_tile_that_does_not_fit_is_split_into_sub_tiles(tmp_path, tiny_checkpoint):
    ckpt = load_checkpoint(tiny_checkpoint)
    image = np.random.default_rng(0).integers(0, 255, (3, 200, 200)).astype(np.float32)
    # the 200-px tile is predicted as 100-px sub-tiles with the default overlap rule: exactly
    # what 100-px tiles give from the start
    half = Segmenter(ckpt, "cpu", tile=100, batch_size=1).scores(image)
    seg = Segmenter(ckpt, "cpu", tile=256)
    oom_above(seg, limit_side=128)
    backed = seg.scores(image)
    assert any("sub-tiles" in n for n in seg.notes)
    assert np.allclose(backed, half, atol=1e-5)
    seg = Segmenter(ckpt, "cpu", tile=256)
    oom_above(seg, limit_side=16)
    with pytest.raises(Exception, match="out of memory even for 32-pixel tiles"):
        seg.scores(image)


def test_effective_margin_of_a_conv_stack_is_its_receptive_field():
    net = torch.nn.Sequential(*[torch.nn.Conv2d(1, 1, 3, padding=1) for _ in range(5)])
    for conv in net:
        torch.nn.init.constant_(conv.weight, 1.0)
    assert effective_margin(net, 64, mass=1.0, in_channels=1) == 5
    assert effective_margin(net, 64, mass=0.5, in_channels=1) < 5


def test_overlap_follows_the_model(tmp_path):
    assert default_overlap(None, 1024) == 256 and default_overlap(40, 1024) == 160
    assert default_overlap(172, 1024) == 512 and default_overlap(172, 2048) == 688
    torch.manual_seed(0)
    model = create_model("dupsampling-rn50", 3, **TINY_BY_ARCH["dupsampling-rn50"])
    path = save_checkpoint(from_model(model, "dupsampling-rn50", CLASSES), tmp_path / "d.pt")
    seg = Segmenter(load_checkpoint(path), "cpu", tile=1024)
    assert seg.overlap == 512 and "context margin 172" in seg.overlap_from
    assert Segmenter(load_checkpoint(path), "cpu", tile=1024, overlap=100).overlap == 100


def test_seam_report_counts_overlap_disagreement(tmp_path, tiny_checkpoint, capsys):
    import rasterio
    from bigseg.tiling import stream_tiles
    # scores that depend on the tile: two overlapping tiles disagree everywhere they overlap
    grid = TileGrid(100, 40, 64, 28)
    calls = {"n": 0}

    def predict(batch):
        calls["n"] += 1
        out = np.zeros((len(batch), 2, *batch.shape[-2:]), np.float32)
        out[:, calls["n"] % 2] = 1
        return out

    seams = {}
    read = lambda w: (np.zeros((1, w.height, w.width), np.float32), np.ones((w.height, w.width), bool))  # noqa: E731
    list(stream_tiles(grid, read, predict, 2, 1, np.zeros((1, 1, 1), np.float32), seams=seams))
    assert seams["compared"] > 0 and seams["disagreed"] == seams["compared"]
    seams = {}
    list(stream_tiles(grid, read, lambda b: np.ones((len(b), 2, *b.shape[-2:]), np.float32), 2, 1,
                      np.zeros((1, 1, 1), np.float32), seams=seams))
    assert seams["compared"] > 0 and seams["disagreed"] == 0
    src = write_geotiff(tmp_path / "a.tif", 300, 200)
    code, out, err = run_cli(capsys, "predict", src, "--model", tiny_checkpoint, "-o", tmp_path / "m.tif",
                             "--tile", "64", "--device", "cpu", "--seams", "--json")
    assert code == 0, err
    report = json.loads(out)["done"][0]["seams"]
    assert 0 <= report["disagreed"] <= report["compared"] > 0
    with rasterio.open(tmp_path / "m.tif") as ds:
        assert float(ds.tags()["seam_disagreement"]) == report["rate"]


def test_writer_rows_in_flight_are_simulated_exactly(tmp_path):
    from bigseg.io.writers import GeoTiffWriter
    from bigseg.plan import writer_rows
    from bigseg.tiling import stream_tiles

    for w, h, t, o in ((300, 1700, 256, 64), (1500, 2100, 1024, 256), (150, 900, 128, 32)):  # 2+ tile columns
        grid = TileGrid(w, h, t, o)
        writer = GeoTiffWriter(tmp_path / f"o{h}.tif", w, h, 1, None)
        peak = 0
        read = lambda win: (np.zeros((1, win.height, win.width), np.float32), np.ones((win.height, win.width), bool))  # noqa: E731
        for win, block in stream_tiles(grid, read, lambda x: x, 1, 2, np.zeros((1, 1, 1), np.float32)):
            writer.write(win, block[0].astype(np.uint8))
            peak = max(peak, sum(b[0].shape[1] for b in writer._bands.values()))
        writer.abort()
        assert peak <= writer_rows(grid) <= peak + 512, (w, h, t, o, peak, writer_rows(grid))
