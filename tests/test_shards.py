"""predict under torchrun (gloo, 2 CPU processes): parts and files split across ranks, outputs
equal to one process bit for bit, a dead rank's part redone on the rerun."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import rasterio

from bigseg.io.outputs import part_path
from bigseg.run.shards import part_rows
from tests.conftest import write_geotiff

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="torchrun tests run on Linux CI")


def torchrun(args, port, env=None, nproc=2, script=None):
    entry = [str(script)] if script else ["-m", "bigseg"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--master-port", str(port),
           *entry, "predict", *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})


def single(args):
    return subprocess.run([sys.executable, "-m", "bigseg", "predict", *map(str, args)], capture_output=True,
                          text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})


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


def test_one_raster_split_across_ranks_equals_one_process(tmp_path, tiny_checkpoint):
    src = write_geotiff(tmp_path / "big.tif", 300, 420, nodata=0)
    common = ["--model", tiny_checkpoint, "--device", "cpu", "--tile", "64", "--overlap", "16", "--probs",
              "--overlay"]
    assert single([src, "-o", tmp_path / "one.tif", *common]).returncode == 0
    proc = torchrun([src, "-o", tmp_path / "two.tif", *common, "--json"], 29521)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout)
    assert len(report["done"]) == 1 and "2 parts" in report["done"][0]["notes"]
    same_raster(tmp_path / "one.tif", tmp_path / "two.tif")
    same_raster(tmp_path / "one.probs.tif", tmp_path / "two.probs.tif")
    import cv2
    assert np.array_equal(cv2.imread(str(tmp_path / "one.overlay.png")), cv2.imread(str(tmp_path / "two.overlay.png")))
    assert not list(tmp_path.glob(".*part*"))


def test_a_dead_rank_leaves_its_part_and_the_rerun_redoes_only_that(tmp_path, tiny_checkpoint):
    src = write_geotiff(tmp_path / "big.tif", 200, 300)
    common = ["--model", tiny_checkpoint, "--device", "cpu", "--tile", "64", "--overlap", "16"]
    assert single([src, "-o", tmp_path / "one.tif", *common]).returncode == 0
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


def test_many_files_are_shared_round_robin(tmp_path, tiny_checkpoint):
    folder = tmp_path / "in"
    folder.mkdir()
    for i in range(3):
        write_geotiff(folder / f"f{i}.tif", 90, 70, seed=i)
    common = ["--model", tiny_checkpoint, "--device", "cpu", "--tile", "64", "--overlap", "16"]
    assert single([folder, "-o", tmp_path / "one", *common]).returncode == 0
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
