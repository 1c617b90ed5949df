"""Resume inside one image: a killed job continues from its journal and equals an uninterrupted run."""
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import rasterio

from bigseg.checkpoint import load_checkpoint
from bigseg.inference import Segmenter, WriteOptions
from bigseg.journal import journal_path, read_journal
from tests.cli_helpers import run_cli
from tests.conftest import interrupt_after, write_geotiff


def predict_cmd(src, dst, ckpt, *extra):
    return [sys.executable, "-m", "bigseg", "predict", str(src), "--model", str(ckpt), "-o", str(dst),
            "--device", "cpu", "--tile", "64", "--overlap", "16", "--batch-size", "2", *extra]


def read(path):
    with rasterio.open(path) as ds:
        return ds.read(), ds.transform, ds.crs, ds.read_masks(1)


def test_sigkill_then_rerun_equals_uninterrupted_bit_for_bit(tmp_path, tiny_checkpoint):
    src = write_geotiff(tmp_path / "big.tif", 900, 1400, nodata=0)
    env = {**os.environ, "BIGSEG_JOURNAL_SECONDS": "0"}
    whole = tmp_path / "whole.tif"
    subprocess.run(predict_cmd(src, whole, tiny_checkpoint, "--probs"), env=env, check=True)

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
    seg = Segmenter(load_checkpoint(tiny_checkpoint), "cpu", tile=64, overlap=16, batch_size=2, journal_seconds=0)
    interrupt_after(seg, 60)
    dst = tmp_path / "a.mask.tif"
    with pytest.raises(KeyboardInterrupt):
        seg.predict_file(src, dst, write=WriteOptions(overlay=True))
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
    Segmenter(ckpt, "cpu", tile=64, overlap=16).predict_file(src, tmp_path / "w.tif", write=WriteOptions(overlay=True))
    seg = Segmenter(ckpt, "cpu", tile=64, overlap=16, journal_seconds=0)
    interrupt_after(seg, 30)
    with pytest.raises(KeyboardInterrupt):
        seg.predict_file(src, tmp_path / "r.tif", write=WriteOptions(overlay=True))
    result = Segmenter(ckpt, "cpu", tile=64, overlap=16).predict_file(src, tmp_path / "r.tif",
                                                                      write=WriteOptions(overlay=True))
    assert any("resuming" in n for n in result.notes)
    assert np.array_equal(cv2.imread(str(tmp_path / "w.overlay.png")), cv2.imread(str(tmp_path / "r.overlay.png")))
    assert np.array_equal(read(tmp_path / "w.tif")[0], read(tmp_path / "r.tif")[0])
