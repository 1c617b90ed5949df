"""The dry run: a plan without running the model, its memory terms simulated or traced exactly;
the seam report."""
import json

import numpy as np
import pytest
import torch

from bigseg.checkpoint import load_checkpoint
from bigseg.tiling.geometry import TileGrid
from bigseg.infer.engines.torch import TorchEngine
from bigseg.run.plan import activation_bytes
from tests.cli_helpers import run_cli
from tests.conftest import write_geotiff


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
