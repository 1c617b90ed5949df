"""The inference wing (`bigseg.infer`): the predictor (batches, scales and flips, out-of-memory
back-off, overlap from the model, blending on the host), the torch engine on the device, the exported
engines and their cache, and the warm start without torch."""
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import cv2
import numpy as np
import pytest
import rasterio
import torch

from bigseg.checkpoint import from_model, load_checkpoint, save_checkpoint
from bigseg.errors import EngineError, InputError
from bigseg.infer.choose import warm_start
from bigseg.infer.engines import export as export_module, exported as exported_module
from bigseg.infer.engines.export import ExportCache
from bigseg.infer.engines.exported import ExportedModel, race
from bigseg.infer.engines.torch import HostCopy, TorchArrays, resolve_device, resolve_precision
from bigseg.infer.predictor import Predictor
from bigseg.infer.settings import Settings
from bigseg.infer.start import open_predictor
from bigseg.models import create_model
from bigseg.models.receptive import effective_margin
from bigseg.run.file_job import predict_file
from bigseg.tiling.geometry import TileGrid, default_overlap
from bigseg.tiling.stitch import Pipeline, stream_tiles
from tests.cli_helpers import run_cli
from tests.conftest import CLASSES, TINY_BY_ARCH, write_geotiff, small_receptive_field_net, tiled_prediction


# --- The predictor: batches independent of size, multi-scale and flip averaging, out-of-memory back-off,
# overlap from the model, blending on the host.


FAST = ["--tile", "128", "--overlap", "32", "--device", "cpu"]


def oom_above(seg, limit_tiles: int = 1, limit_side: int = 10 ** 9):
    real = seg.engine.scores

    def guarded(batch):
        if len(batch) > limit_tiles or max(batch.shape[-2:]) > limit_side:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(batch)
    seg.engine.scores = guarded


def test_batch_size_does_not_change_the_result(tmp_path, tiny_checkpoint):
    image = np.random.default_rng(3).uniform(0, 255, (3, 200, 300)).astype(np.float32)
    ckpt = load_checkpoint(tiny_checkpoint)
    a = Predictor(ckpt, "cpu", "fp32", tile=128, overlap=32, batch_size=1).scores(image)
    b = Predictor(ckpt, "cpu", "fp32", tile=128, overlap=32, batch_size=5).scores(image)
    np.testing.assert_allclose(a, b, atol=1e-4)


def test_multiscale_and_flip_average_probabilities(tiny_checkpoint, tmp_path, capsys):
    import torch
    import torch.nn.functional as F

    ckpt = load_checkpoint(tiny_checkpoint)
    image = np.random.default_rng(4).uniform(0, 255, (3, 96, 128)).astype(np.float32)
    seg = Predictor(ckpt, "cpu", "fp32", tile=256, scales=(0.5, 1.0), flip=True)
    probs = seg.scores(image)
    assert np.allclose(probs.sum(0), 1, atol=1e-5)
    model = ckpt.build_model()
    x = (torch.from_numpy(image)[None] - torch.tensor(ckpt.normalization.mean).view(1, -1, 1, 1)) / torch.tensor(ckpt.normalization.std).view(1, -1, 1, 1)
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


def test_turns_average_the_eight_symmetries_so_a_turned_image_gives_the_turned_prediction(tiny_checkpoint, tmp_path,
                                                                                          capsys):
    ckpt = load_checkpoint(tiny_checkpoint)
    image = np.random.default_rng(5).uniform(0, 255, (3, 96, 128)).astype(np.float32)  # not square
    model = ckpt.build_model().eval()
    x = (torch.from_numpy(image)[None] - torch.tensor(ckpt.normalization.mean).view(1, -1, 1, 1)) / torch.tensor(
        ckpt.normalization.std).view(1, -1, 1, 1)
    expected = 0
    with torch.no_grad():
        for k in range(4):
            for mirror in (False, True):
                xv = torch.rot90(x, k, (2, 3))
                y = model(xv.flip(-1) if mirror else xv)
                expected = expected + torch.rot90(y.flip(-1) if mirror else y, -k, (2, 3)).softmax(1)
    both = Predictor(ckpt, "cpu", "fp32", tile=256, flip=True, turns=True)
    probs = both.scores(image)
    np.testing.assert_allclose(probs, (expected / 8)[0].numpy(), atol=1e-5)
    # averaged over the whole group, the prediction of a turned or mirrored image is the turned or
    # mirrored prediction (what a model of imagery seen from above should give); without turns it is not
    for k, mirror in ((1, False), (2, True), (3, False)):
        moved = np.rot90(image, k, (1, 2))[..., ::-1] if mirror else np.rot90(image, k, (1, 2))
        want = np.rot90(probs, k, (1, 2))[..., ::-1] if mirror else np.rot90(probs, k, (1, 2))
        np.testing.assert_allclose(both.scores(np.ascontiguousarray(moved)), want, atol=1e-5)
    plain = Predictor(ckpt, "cpu", "fp32", tile=256)
    turned = plain.scores(np.ascontiguousarray(np.rot90(image, 1, (1, 2))))
    assert np.abs(turned - np.rot90(plain.scores(image), 1, (1, 2))).max() > 1e-3
    # turns alone: the four quarter turns; a resumed run does not mix them with a run without
    alone = Predictor(ckpt, "cpu", "fp32", tile=256, turns=True)
    assert alone.averages_probabilities and alone.fingerprint()["turns"] is True and "turns" not in plain.fingerprint()
    assert np.allclose(alone.scores(image).sum(0), 1, atol=1e-5)

    # from the CLI: predict tiles with them, eval reports them
    src = write_geotiff(tmp_path / "turned.tif", 150, 130)
    code, _, err = run_cli(capsys, "predict", src, "-m", tiny_checkpoint, "-o", tmp_path / "o", "--rotate", "--flip",
                           "--probs", *FAST)
    assert code == 0, err
    with rasterio.open(tmp_path / "o" / "turned.probs.tif") as p:
        assert np.abs(p.read().astype(int).sum(0) - 255).max() <= 2


def test_out_of_memory_halves_the_batch_with_the_same_output(tmp_path, tiny_checkpoint):
    import rasterio
    src = write_geotiff(tmp_path / "a.tif", 400, 300)
    ckpt = load_checkpoint(tiny_checkpoint)
    predict_file(Predictor(ckpt, "cpu", tile=64, overlap=16, batch_size=1), src, tmp_path / "one.tif")
    seg = Predictor(ckpt, "cpu", tile=64, overlap=16, batch_size=8)
    oom_above(seg, limit_tiles=2)
    result = predict_file(seg, src, tmp_path / "backoff.tif")
    assert seg.fitting_batch == 2
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
    half = Predictor(ckpt, "cpu", tile=100, batch_size=1).scores(image)
    seg = Predictor(ckpt, "cpu", tile=256)
    oom_above(seg, limit_side=128)
    backed = seg.scores(image)
    assert any("sub-tiles" in n for n in seg.notes)
    assert np.allclose(backed, half, atol=1e-5)
    seg = Predictor(ckpt, "cpu", tile=256)
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
    seg = Predictor(load_checkpoint(path), "cpu", tile=1024)
    assert seg.overlap == 512 and "context margin 172" in seg.overlap_from
    assert Predictor(load_checkpoint(path), "cpu", tile=1024, overlap=100).overlap == 100


def test_blending_on_the_host_when_the_band_does_not_fit_gives_the_same_mask(tmp_path, tiny_checkpoint, monkeypatch):
    import rasterio

    from bigseg.checkpoint import load_checkpoint
    from bigseg.infer.engines.torch import TorchEngine
    from bigseg.infer.predictor import Predictor
    from bigseg.run.file_job import predict_file
    from tests.conftest import write_geotiff

    src = write_geotiff(tmp_path / "a.tif", 300, 200)
    seg = Predictor(load_checkpoint(tiny_checkpoint), "cpu", tile=64, overlap=16)
    predict_file(seg, src, tmp_path / "device.tif")
    monkeypatch.setattr(TorchEngine, "blends_on_device", lambda self, grid: False)
    result = predict_file(seg, src, tmp_path / "host.tif")
    assert any("blending on the host" in n for n in result.notes)
    with rasterio.open(tmp_path / "device.tif") as a, rasterio.open(tmp_path / "host.tif") as b:
        assert np.array_equal(a.read(), b.read())


def test_the_python_api_says_how_to_pass_an_image_and_scales_a_float_image_in_0_to_1(tmp_path, tiny_checkpoint):
    import warnings

    from bigseg import BigsegError
    from bigseg.checkpoint import load_checkpoint
    from bigseg.infer.predictor import Predictor

    seg = Predictor(load_checkpoint(tiny_checkpoint), "cpu", "fp32", tile=64)
    image = np.random.default_rng(0).integers(0, 256, (3, 48, 72)).astype(np.uint8)
    for bad, says in ((image.transpose(1, 2, 0), "looks like (height, width, bands): pass np.moveaxis(image, -1, 0)"),
                      (image[0], "a 2-D 48x72 array: one band is image[None]"),
                      (np.concatenate([image, image[:1]]), "has 4 band(s) first (4x48x72); the model takes 3")):
        with pytest.raises(BigsegError, match=re.escape(says)):
            seg.segment(bad)
    with pytest.raises(BigsegError, match="valid is 10x10; the image is 48x72"):
        seg.segment(image, np.ones((10, 10), bool))
    with pytest.warns(UserWarning, match=r"values lie in 0\.\.1; the model takes 0\.\.255"):
        scaled = seg.segment(image / 255.0)
    assert np.array_equal(scaled, seg.segment(image)) and seg.take_notes()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # 8-bit values as floats are what the model takes: no warning
        seg.segment(image.astype(np.float32))


def test_predict_file_creates_a_missing_output_folder_as_the_cli_does(tmp_path, tiny_checkpoint):
    from bigseg.checkpoint import load_checkpoint
    from bigseg.infer.predictor import Predictor
    from bigseg.run.file_job import predict_file

    src = write_geotiff(tmp_path / "a.tif", 64, 48)
    seg = Predictor(load_checkpoint(tiny_checkpoint), "cpu", "fp32", tile=64)
    result = predict_file(seg, src, tmp_path / "new" / "deeper" / "a.mask.tif")
    assert result.output.is_file()


# --- Device side of predict: torch stitching equals numpy stitching (to float32 rounding); host copies.


def test_torch_arrays_stitch_like_numpy():
    grid = TileGrid(333, 250, 96, 40)
    rng = np.random.default_rng(3)
    image = rng.normal(size=(3, 250, 333)).astype(np.float32)
    valid = rng.random((250, 333)) > 0.05
    read = lambda win: (image[(slice(None), *win.slices)], valid[win.slices])

    def predict(x):  # tile-dependent scores, so blending matters
        return np.tanh(x * (1 + x.mean(axis=(1, 2, 3), keepdims=True)))

    fill = np.zeros((3, 1, 1), np.float32)
    expected = {w: b.copy() for w, b, _ in stream_tiles(grid, read, Pipeline(predict, 3, fill, 4))}
    got = {w: b.numpy() for w, b, _ in stream_tiles(grid, read, Pipeline(lambda x: torch.from_numpy(predict(x)), 3, fill,
                                                                        4, arrays=TorchArrays(torch.device("cpu"))))}
    assert expected.keys() == got.keys()
    for w in expected:
        # torch accumulates with a fused multiply-add: at most a rounding step from numpy's two ops
        np.testing.assert_allclose(got[w], expected[w], rtol=0, atol=1e-6)
        assert np.array_equal(got[w].argmax(0), expected[w].argmax(0)), w


def test_host_copy_gives_numpy_arrays():
    labels = torch.arange(12, dtype=torch.uint8).reshape(3, 4)
    arrays = HostCopy({"labels": labels}).numpy()
    assert isinstance(arrays["labels"], np.ndarray) and arrays["labels"].tolist() == labels.tolist()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_host_copy_from_the_gpu_waits_for_its_copy():
    x = torch.randn(4, 300, 300, device="cuda")
    labels = x.argmax(0).to(torch.uint8)
    assert np.array_equal(HostCopy({"l": labels}).numpy()["l"], labels.cpu().numpy())


def test_devices_and_precisions_are_checked():
    assert resolve_device("cpu").type == "cpu"
    assert resolve_precision("auto", torch.device("cpu")) is torch.float32
    with pytest.raises(InputError, match="fp16 needs a GPU"):
        resolve_precision("fp16", torch.device("cpu"))
    with pytest.raises(InputError, match="unknown device"):
        resolve_device("tpu:0")
    if not torch.cuda.is_available():
        with pytest.raises(InputError, match="CUDA is not available"):
            resolve_device("cuda")


# --- Inference engines: the exported engines (OpenVINO, ONNX Runtime) export once per (padded) shape into the
# cache and reuse it and OpenVINO's compiled blobs, rebuild a damaged entry, fall back to torch for a model
# they cannot export, and predict what torch predicts (tiled equals whole for a small receptive field through
# them too); auto times every engine once per shape and machine and keeps the fastest, and exports only once a
# shape has run long enough in torch to be worth it; the precision is bf16 only where the CPU has bf16 units,
# fp32 when asked.


pytest.importorskip("openvino")


pytest.importorskip("onnxscript")


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("engine-cache")


def test_auto_is_openvino_on_the_cpu_and_names_are_checked(tiny_checkpoint, cache, monkeypatch):
    monkeypatch.setenv("BIGSEG_CACHE", str(cache))
    ckpt = load_checkpoint(tiny_checkpoint)
    auto = Predictor(ckpt, "cpu", tile=128, engine="auto").engine.model
    assert auto.name == "auto" and auto.runtimes == ("openvino", "onnx")
    assert Predictor(ckpt, "cpu", tile=128, engine="torch").engine.name == "torch"
    assert Predictor(ckpt, "cpu", tile=128, engine="onnx").engine.model.runtimes == ("onnx",)
    with pytest.raises(InputError, match="engine takes auto, torch, openvino, onnx"):
        Predictor(ckpt, "cpu", tile=128, engine="tensorrt")


def test_export_once_then_reuse_the_cache_with_torchs_labels(tiny_checkpoint, cache, monkeypatch):
    monkeypatch.setenv("BIGSEG_CACHE", str(cache))
    ckpt = load_checkpoint(tiny_checkpoint)
    image = np.random.default_rng(0).uniform(0, 255, (3, 200, 300)).astype(np.float32)
    torch_scores = Predictor(ckpt, "cpu", "fp32", tile=128, overlap=32, engine="torch").scores(image)
    first = Predictor(ckpt, "cpu", "fp32", tile=128, overlap=32, engine="openvino")
    exported_scores = first.scores(image)
    assert any("exporting the model for OpenVINO, 128x128 tiles: once" in n for n in first.notes)
    exports = sorted((cache / "onnx").glob("*.onnx"))
    assert len(exports) == 1 and exports[0].with_suffix(".json").is_file()
    blobs = sorted((cache / "openvino").glob("*.blob"))
    assert len(blobs) == 1  # OpenVINO's compiled model, cached (the export's check compiled without caching)
    assert all(p.stat().st_mode & 0o044 == 0o044 for p in [*exports, exports[0].with_suffix(".json"), *blobs])
    again = Predictor(ckpt, "cpu", "fp32", tile=128, overlap=32, engine="openvino")
    assert np.array_equal(again.scores(image), exported_scores) and not again.notes  # a cache hit, said nothing
    assert sorted((cache / "openvino").glob("*.blob")) == blobs  # compiled from the cache, not again
    agree = (exported_scores.argmax(0) == torch_scores.argmax(0)).mean()
    assert agree >= 0.995
    p_exported, p_torch = (torch.from_numpy(s).softmax(0).numpy() for s in (exported_scores, torch_scores))
    assert (np.abs(np.round(p_exported * 255) - np.round(p_torch * 255)) <= 1).mean() >= 0.99
    assert first.fingerprint()["engine"] == "openvino"  # a resume with another engine starts over


def test_a_damaged_cache_entry_is_exported_again(tiny_checkpoint, cache, monkeypatch):
    monkeypatch.setenv("BIGSEG_CACHE", str(cache))
    ckpt = load_checkpoint(tiny_checkpoint)
    image = np.random.default_rng(1).uniform(0, 255, (3, 128, 128)).astype(np.float32)
    expected = Predictor(ckpt, "cpu", "fp32", tile=128, engine="openvino").scores(image)  # the entry of test above
    entry = next((cache / "onnx").glob("*.onnx"))
    entry.write_bytes(entry.read_bytes()[: entry.stat().st_size // 2])
    predictor = Predictor(ckpt, "cpu", "fp32", tile=128, engine="openvino")
    assert np.array_equal(predictor.scores(image), expected)
    assert any("damaged or incomplete: exporting it again" in n for n in predictor.notes)


def test_auto_times_both_engines_once_and_keeps_the_faster(tiny_checkpoint, tmp_path, monkeypatch):
    monkeypatch.setenv("BIGSEG_CACHE", str(tmp_path))
    monkeypatch.setattr(exported_module, "AUTO_EXPORT_AFTER_S", 0.0)  # export at the first tile
    ckpt = load_checkpoint(tiny_checkpoint)
    image = np.random.default_rng(2).uniform(0, 255, (3, 128, 128)).astype(np.float32)
    (tmp_path / "onnx").mkdir()
    stale, fresh = tmp_path / "onnx" / ".killed.x1.onnx", tmp_path / "onnx" / ".running.x2.onnx"
    stale.write_bytes(b"half"), fresh.write_bytes(b"half")
    os.utime(stale, (time.time() - 7200, time.time() - 7200))
    first = Predictor(ckpt, "cpu", "fp32", tile=128, engine="auto")
    first.scores(image)
    assert not stale.exists() and fresh.exists()  # a killed export's leftover goes, a running one's stays
    assert any("is fastest here on 128x128 tiles" in n for n in first.notes)
    record = json.loads(next((tmp_path / "onnx").glob("*.json")).read_text())
    (machine, timing), = record["timings"].items()
    assert set(timing) == {"openvino", "onnx", "torch"} and all(t > 0 for t in timing.values())
    again = Predictor(ckpt, "cpu", "fp32", tile=128, engine="auto")
    again.scores(image)
    assert not again.notes  # measured once, then read from the record

    # a record saying torch is faster makes auto run torch on that shape, exactly
    meta = next((tmp_path / "onnx").glob("*.json"))
    record["timings"][machine] = {"openvino": 9.0, "onnx": 9.0, "torch": 0.1}
    meta.write_text(json.dumps(record))
    auto = Predictor(ckpt, "cpu", "fp32", tile=128, engine="auto").scores(image)
    assert np.array_equal(auto, Predictor(ckpt, "cpu", "fp32", tile=128, engine="torch").scores(image))
    assert not np.array_equal(auto, Predictor(ckpt, "cpu", "fp32", tile=128, engine="openvino").scores(image))


def test_auto_timing_is_the_best_of_interleaved_calls_so_a_burst_of_load_does_not_decide(monkeypatch):
    clock, calls = [0.0], []
    monkeypatch.setattr(exported_module, "time", SimpleNamespace(perf_counter=lambda: clock[0]))
    costs = {"openvino": iter([5.0, 4.0, 1.0]), "torch": iter([2.0, 2.0, 2.0])}  # warm-up, a burst, then alone

    def run(name):
        calls.append(name)
        clock[0] += next(costs[name])

    timing = race({"openvino": lambda: run("openvino"), "torch": lambda: run("torch")})
    assert calls == ["openvino", "torch", "openvino", "torch", "torch", "openvino"]  # warm-ups, then A B, B A
    assert timing == {"openvino": 1.0, "torch": 2.0}  # one slowed call alone would have recorded torch


def test_auto_runs_a_small_job_in_torch_and_exports_once_torch_has_spent_an_exports_cost(
        tiny_checkpoint, tmp_path, monkeypatch):
    monkeypatch.setenv("BIGSEG_CACHE", str(tmp_path))
    ckpt = load_checkpoint(tiny_checkpoint)
    image = np.random.default_rng(3).uniform(0, 255, (3, 128, 128)).astype(np.float32)
    in_torch = Predictor(ckpt, "cpu", "fp32", tile=128, engine="torch").scores(image)
    exports = lambda: list(tmp_path.glob("onnx/*.onnx"))
    small = Predictor(ckpt, "cpu", "fp32", tile=128, engine="auto")
    assert np.array_equal(small.scores(image), in_torch)
    assert not exports() and not small.notes  # a photo: no export, no timing, nothing to say

    monkeypatch.setenv("BIGSEG_CACHE", str(tmp_path / "other"))  # the small job's torch time would count
    exports = lambda: list(tmp_path.glob("other/onnx/*.onnx"))
    monkeypatch.setattr(exported_module, "AUTO_EXPORT_AFTER_S", 1e-9)
    large = Predictor(ckpt, "cpu", "fp32", tile=128, engine="auto")
    assert np.array_equal(large.scores(image), in_torch) and not exports()  # nothing spent in torch yet
    large.scores(image)  # torch has now spent more than an export costs: exported and timed
    assert len(exports()) == 1 and any("exporting the model" in n for n in large.notes)
    assert any("is fastest here on 128x128 tiles" in n for n in large.notes)
    monkeypatch.setattr(exported_module, "AUTO_EXPORT_AFTER_S", 1e9)
    cached = Predictor(ckpt, "cpu", "fp32", tile=128, engine="auto")
    cached.scores(image)
    assert cached.engine.model.sessions  # a cached export is used at once, however small the job


def test_auto_adds_up_the_torch_time_of_separate_runs_before_exporting(tiny_checkpoint, tmp_path, monkeypatch):
    monkeypatch.setenv("BIGSEG_CACHE", str(tmp_path))
    ckpt = load_checkpoint(tiny_checkpoint)
    image = np.random.default_rng(4).uniform(0, 255, (3, 128, 128)).astype(np.float32)
    Predictor(ckpt, "cpu", "fp32", tile=128, engine="auto").scores(image)  # one small run: torch only
    rent = list(tmp_path.glob("onnx/*.torch-seconds"))
    assert len(rent) == 1 and not list(tmp_path.glob("onnx/*.onnx"))
    spent = float(rent[0].read_text())
    assert spent > 0
    monkeypatch.setattr(exported_module, "AUTO_EXPORT_AFTER_S", spent)  # the next run starts where that one stopped
    second = Predictor(ckpt, "cpu", "fp32", tile=128, engine="auto")
    second.scores(image)
    assert len(list(tmp_path.glob("onnx/*.onnx"))) == 1 and any("exporting the model" in n for n in second.notes)
    assert not rent[0].exists()  # exported: nothing left to add up


def test_a_named_engine_that_cannot_export_the_model_is_an_error_and_auto_runs_torch_with_a_note(tmp_path):
    torch.manual_seed(0)
    model = create_model("dynamic-routing-l16", 3, **TINY_BY_ARCH["dynamic-routing-l16"]).eval()
    x = torch.randn(2, 3, 64, 64)
    named = _engine("openvino", model, tmp_path / "named")
    with torch.inference_mode(), pytest.raises(EngineError, match="cannot be exported for OpenVINO.*--engine torch"):
        named(x)
    notes = []
    auto = _engine("auto", model, tmp_path / "auto", notes.append)
    auto.export_after = 0.0
    with torch.inference_mode():
        assert torch.equal(auto(x), model(x)) and torch.equal(auto(x), model(x))
    assert len([n for n in notes if "cannot be exported" in n and "using torch" in n]) == 1


def test_a_failed_export_is_tried_once_per_versions_and_again_after_an_upgrade(tmp_path, monkeypatch):
    """Remembered per model, shape and the versions of torch, the exporter and both runtimes:
    later runs (auto or named) do not pay for it again; an upgrade of any of them retries."""
    torch.manual_seed(0)
    model = create_model("dynamic-routing-l16", 3, **TINY_BY_ARCH["dynamic-routing-l16"]).eval()
    monkeypatch.setattr(exported_module, "AUTO_EXPORT_AFTER_S", 1e-9)
    tries = []
    real_export = exported_module.export
    monkeypatch.setattr(exported_module, "export", lambda *a: (tries.append(a), real_export(*a)))
    x = torch.randn(2, 3, 64, 64)

    def run(name: str) -> list[str]:  # each run its own engine, as separate processes would have
        notes = []
        engine = _engine(name, model, tmp_path, notes.append)
        with torch.inference_mode():
            for _ in range(2):
                assert torch.equal(engine(x), model(x))
        return notes

    assert any("cannot be exported" in n for n in run("auto")) and len(tries) == 1
    second = run("auto")
    assert len(second) == 1 and "an earlier run's export failed" in second[0] and len(tries) == 1
    with torch.inference_mode(), pytest.raises(EngineError, match="earlier export with the same versions failed"):
        _engine("openvino", model, tmp_path)(x)
    assert len(tries) == 1
    monkeypatch.setattr(export_module, "runtime_versions", lambda: {"openvino": "9999.0"})
    run("auto")
    assert len(tries) == 2


def _engine(name, model, folder, note=print):
    """The exported runtimes of a torch run, as `--engine name` makes them, caching in `folder`."""
    runtimes = ("openvino", "onnx") if name == "auto" else (name,)
    return ExportedModel(model, ExportCache({"arch": "dynamic-routing-l16"}, 3, folder), runtimes, 1, note,
                         choose=name == "auto")


def test_tiled_equals_whole_through_the_engine_for_a_small_receptive_field(tmp_path):
    net = small_receptive_field_net()  # receptive radius 4 = the dead zone overlap/4 of 96-px tiles
    engine = ExportedModel(net, ExportCache({"net": "conv2"}, 3, tmp_path), ("openvino",), 1, lambda m: None)
    image = np.random.default_rng(1).uniform(0, 255, (3, 301, 437)).astype(np.float32)
    with torch.inference_mode():
        whole = net(torch.from_numpy(image)[None])[0].numpy()
        tiled = tiled_prediction(lambda x: engine(torch.from_numpy(x)).numpy(), image)
    np.testing.assert_allclose(tiled, whole, rtol=1e-4, atol=1e-3)
    assert set(engine.sessions) == {(96, 96)}
    assert all(s is not None for s in engine.sessions.values())


def test_scales_flips_and_the_crf_run_through_the_engine_as_through_torch(tiny_checkpoint, tmp_path, monkeypatch):
    from bigseg.crf.params import CRFParams

    monkeypatch.setenv("BIGSEG_CACHE", str(tmp_path))
    ckpt = load_checkpoint(tiny_checkpoint)
    image = np.random.default_rng(3).uniform(0, 255, (3, 160, 200)).astype(np.float32)
    settings = dict(tile=128, overlap=32, scales=(0.75, 1.0), flip=True, crf=CRFParams(backend="window", iterations=3))
    exported = Predictor(ckpt, "cpu", "fp32", engine="openvino", **settings)
    probs = {"openvino": exported.scores(image),
             "torch": Predictor(ckpt, "cpu", "fp32", engine="torch", **settings).scores(image)}
    assert (probs["openvino"].argmax(0) == probs["torch"].argmax(0)).mean() >= 0.995
    assert (np.abs(probs["openvino"] - probs["torch"]) <= 1 / 255).mean() >= 0.99
    assert set(exported.engine.model.sessions) == {(128, 128)}  # 96 px tiles padded to the model's 64: one export
    assert all(session is not None for session in exported.engine.model.sessions.values())


def test_the_torch_engine_runs_the_model_itself(tiny_checkpoint):
    engine = Predictor(load_checkpoint(tiny_checkpoint), "cpu", "fp32", tile=128, engine="torch").engine
    assert engine.model is engine.module and engine.name == "torch" and engine.expected_runtime((128, 128)) is None


def test_the_memory_estimate_counts_openvino_only_where_it_will_run(tiny_checkpoint, tmp_path, monkeypatch):
    from bigseg.run.plan import CPU_ACTIVATION_OVERHEAD, EXPORTED_MEMORY, memory_estimate

    monkeypatch.setenv("BIGSEG_CACHE", str(tmp_path))
    ckpt = load_checkpoint(tiny_checkpoint)
    by_engine = {e: memory_estimate(Predictor(ckpt, "cpu", "fp32", tile=128, engine=e), 500, 400, 3)
                 for e in ("torch", "openvino", "auto")}
    assert by_engine["torch"]["exported"] == 0 and by_engine["openvino"]["exported"] > 0
    ratio = by_engine["openvino"]["activations"] / by_engine["torch"]["activations"]
    assert ratio == pytest.approx(EXPORTED_MEMORY["openvino"][0] / CPU_ACTIVATION_OVERHEAD, rel=0.01)
    assert by_engine["auto"] == by_engine["openvino"]  # not timed yet: assume the export runs

    monkeypatch.setattr(exported_module, "AUTO_EXPORT_AFTER_S", 0.0)
    auto = Predictor(ckpt, "cpu", "fp32", tile=128, engine="auto")
    auto.scores(np.zeros((3, 128, 128), np.float32))  # times both engines and records which is faster
    meta = next((tmp_path / "onnx").glob("*.json"))
    record = json.loads(meta.read_text())
    (machine, _), = record["timings"].items()
    record["timings"][machine] = {"openvino": 9.0, "onnx": 9.0, "torch": 0.1}
    meta.write_text(json.dumps(record))
    assert memory_estimate(Predictor(ckpt, "cpu", "fp32", tile=128, engine="auto"), 500, 400, 3) == by_engine["torch"]


def test_bf16_only_where_the_cpu_has_bf16_units_and_fp32_when_asked(tiny_checkpoint, tmp_path, monkeypatch):
    from bigseg.infer import choose

    monkeypatch.setenv("BIGSEG_CACHE", str(tmp_path))
    monkeypatch.delenv("BIGSEG_PRECISION")  # the tests pin fp32; here auto decides
    ckpt = load_checkpoint(tiny_checkpoint)
    for native, expected in ((False, "f32"), (True, "bf16")):
        monkeypatch.setattr(choose, "native_bf16", lambda: native)
        auto = Predictor(ckpt, "cpu", "auto", tile=128, engine="openvino")
        assert auto.engine.model.precision == expected and auto.engine.dtype == (torch.bfloat16 if native else torch.float32)
        forced = Predictor(ckpt, "cpu", "fp32", tile=128, engine="openvino")  # never bf16 behind the user's back
        assert forced.engine.model.precision == "f32" and forced.engine.dtype == torch.float32
    monkeypatch.setenv("BIGSEG_PRECISION", "fp32")
    assert Predictor(ckpt, "cpu", "auto", tile=128, engine="openvino").engine.model.precision == "f32"


def test_images_of_nearby_sizes_share_one_export_and_padding_changes_nothing(tiny_checkpoint, tmp_path, monkeypatch):
    monkeypatch.setenv("BIGSEG_CACHE", str(tmp_path))
    ckpt = load_checkpoint(tiny_checkpoint)
    seg = Predictor(ckpt, "cpu", "fp32", tile=256, engine="openvino")
    rng = np.random.default_rng(5)
    for h, w in ((100, 130), (120, 150)):  # both padded to 128 x 192 (the ladder's multiple is 64)
        image = rng.uniform(0, 255, (3, h, w)).astype(np.float32)
        exported = seg.scores(image)
        in_torch = Predictor(ckpt, "cpu", "fp32", tile=256, engine="torch").scores(image)
        assert exported.shape == (3, h, w) and (exported.argmax(0) == in_torch.argmax(0)).mean() > 0.995
    assert set(seg.engine.model.sessions) == {(128, 192)} and len(list((tmp_path / "onnx").glob("*.onnx"))) == 1


@pytest.mark.parametrize("name", sorted(TINY_BY_ARCH))
def test_every_model_predicts_the_same_from_an_input_already_padded_to_its_multiple(name):
    """What lets the exported engine pad tiles to the model's multiple before choosing an export."""
    from bigseg.models.blocks import pad_to_multiple

    torch.manual_seed(0)
    model = create_model(name, 3, **TINY_BY_ARCH[name]).eval()
    x = torch.randn(1, 3, 70, 90)
    with torch.inference_mode():
        padded = model(pad_to_multiple(x, model.output_multiple)[0])[..., :70, :90]
        assert torch.equal(model(x), padded)


@pytest.mark.parametrize("capabilities,flags,expected", [
    (["BF16", "FP32", "INT8"], "avx2", True),          # OpenVINO's word wins over the flags
    (["FP32", "INT8"], "avx512_bf16 avx2", False),
    (None, "avx512_bf16 avx2", True),                  # no OpenVINO: the CPU's flags
    (None, "avx2 fma", False),
])
def test_bf16_units_are_decided_as_openvino_reports_them_and_asked_once(capabilities, flags, expected, tmp_path,
                                                                       monkeypatch):
    from bigseg.infer import cache

    monkeypatch.setenv("BIGSEG_CACHE", str(tmp_path))
    asked = []
    monkeypatch.setattr(cache, "openvino_capabilities", lambda: asked.append(1) or list(capabilities))
    monkeypatch.setattr(cache, "_version", lambda p: "none" if capabilities is None and p == "openvino" else "1.0")
    monkeypatch.setattr(cache, "_cpu_flags", lambda: set(flags.split()))
    assert cache.native_bf16() is expected and cache.native_bf16() is expected
    assert len(asked) == (0 if capabilities is None else 1)  # remembered per CPU and OpenVINO version


# --- A warm start without torch: once the torch predictor has exported a model for OpenVINO (and, for auto,
# timed it here), `bigseg predict` runs from the cache without importing torch, with the same labels, the same
# resume fingerprint, and the torch predictor for anything the cache lacks.


pytest.importorskip("openvino")


RUN = """
import sys
from bigseg import cli
sys.argv = ["bigseg", "predict", *sys.argv[1:]]
try:
    cli.main()
except SystemExit as e:
    code = e.code
print("TORCH" if "torch" in sys.modules else "NO TORCH", flush=True)
"""


def predict(args, cache: Path) -> tuple[str, str]:
    import os

    env = {**os.environ, "BIGSEG_CACHE": str(cache), "BIGSEG_PRECISION": "fp32"}
    env.pop("BIGSEG_ENGINE", None)
    done = subprocess.run([sys.executable, "-c", RUN, *map(str, args)], capture_output=True, text=True, env=env,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip().splitlines()[-1], done.stderr


def predict_here(args, cache: Path, capsys, monkeypatch) -> str:
    """`bigseg predict` in this process, whose exporter is warm (a new process spends seconds
    starting torch's exporter): for the runs whose only part is to fill the cache."""
    monkeypatch.setenv("BIGSEG_CACHE", str(cache))
    monkeypatch.delenv("BIGSEG_ENGINE")
    code, _, err = run_cli(capsys, "predict", *args)
    assert code == 0, err
    return err


def test_a_cached_export_predicts_without_torch_with_the_same_labels(tmp_path, tiny_checkpoint, capsys, monkeypatch):
    image = np.random.default_rng(0).integers(0, 255, (90, 120, 3)).astype(np.uint8)
    cv2.imwrite(str(tmp_path / "a.png"), image)
    cv2.imwrite(str(tmp_path / "b.png"), image[:70, :100])  # pads to the same 128 x 128 tiles
    cv2.imwrite(str(tmp_path / "c.png"), np.tile(image, (2, 2, 1)))  # another tile shape: not cached yet
    cache = tmp_path / "cache"
    common = ["--model", tiny_checkpoint, "--device", "cpu", "--engine", "openvino", "--tile", "256", "--probs"]
    err = predict_here([tmp_path / "a.png", "-o", tmp_path / "first", *common], cache, capsys, monkeypatch)
    assert "exporting the model for OpenVINO" in err  # the torch predictor exports (in this process: torch is warm)
    assert list((cache / "models").glob("*.json"))  # and keeps the model's card
    warm, err = predict([tmp_path / "a.png", tmp_path / "b.png", "-o", tmp_path / "warm", *common], cache)
    assert warm == "NO TORCH", err
    read = lambda path: cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    assert np.array_equal(read(tmp_path / "warm" / "a.mask.png"), read(tmp_path / "first" / "a.mask.png"))
    import tifffile

    probs = [tifffile.imread(tmp_path / run / "a.probs.tif") for run in ("first", "warm")]
    assert np.abs(probs[0].astype(int) - probs[1].astype(int)).max() <= 1  # numpy's softmax: within 1/255
    # the same labels as the torch engine, here too for the smaller image
    ckpt = load_checkpoint(tiny_checkpoint)
    expected = Predictor(ckpt, "cpu", "fp32", tile=256, engine="torch").segment(image[:70, :100, ::-1].transpose(2, 0, 1))
    got = cv2.imread(str(tmp_path / "warm" / "b.mask.png"), cv2.IMREAD_UNCHANGED)
    assert (got == expected).mean() > 0.995
    # a tile shape the cache lacks is the torch predictor's (torch imported then), and exported for next time
    mixed, err = predict([tmp_path / "a.png", tmp_path / "c.png", "-o", tmp_path / "mixed", *common], cache)
    assert mixed == "TORCH" and (tmp_path / "mixed" / "c.mask.png").is_file()
    again, _ = predict([tmp_path / "c.png", "-o", tmp_path / "again", *common], cache)
    assert again == "NO TORCH"


def test_auto_starts_without_torch_only_where_this_machine_chose_openvino(tmp_path, tiny_checkpoint, capsys,
                                                                         monkeypatch):
    image = np.random.default_rng(1).integers(0, 255, (64, 64, 3)).astype(np.uint8)
    cv2.imwrite(str(tmp_path / "a.png"), image)
    cache = tmp_path / "cache"
    monkeypatch.setenv("BIGSEG_CACHE", str(cache))
    common = ["--model", tiny_checkpoint, "--device", "cpu", "--tile", "64"]
    predict_here([tmp_path / "a.png", "-o", tmp_path / "o1", "--engine", "openvino", *common], cache, capsys,
                 monkeypatch)  # exported, not timed
    cold, _ = predict([tmp_path / "a.png", "-o", tmp_path / "o2", *common], cache)
    assert cold == "TORCH"  # auto times both engines once, with torch
    meta = next((cache / "onnx").glob("*.json"))
    timings = json.loads(meta.read_text())["timings"]
    assert len(timings) == 1
    warm, _ = predict([tmp_path / "a.png", "-o", tmp_path / "o3", *common], cache)
    assert warm == ("NO TORCH" if next(iter(timings.values()))["openvino"] <= next(iter(timings.values()))["torch"]
                    else "TORCH")
    record = json.loads(meta.read_text())  # torch recorded as faster here: auto runs torch
    machine = next(iter(record["timings"]))
    record["timings"][machine] = {"openvino": 9.0, "torch": 0.1}
    meta.write_text(json.dumps(record))
    assert predict([tmp_path / "a.png", "-o", tmp_path / "o4", *common], cache)[0] == "TORCH"


def test_the_exported_predictor_resumes_what_the_torch_one_began_and_refuses_what_it_cannot_do(
        tmp_path, tiny_checkpoint, monkeypatch):
    monkeypatch.setenv("BIGSEG_CACHE", str(tmp_path))
    ckpt = load_checkpoint(tiny_checkpoint)
    torch_side = Predictor(ckpt, "cpu", "fp32", tile=128, engine="openvino")
    torch_side.predict(np.zeros((1, 3, 128, 128), np.float32))  # exports
    settings = dict(device="cpu", precision="fp32", tile=128, engine="openvino")
    light = open_predictor(str(tiny_checkpoint), Settings(**settings))
    same = lambda settings: json.dumps(settings, sort_keys=True, default=str)  # as the journal hashes them
    assert type(light.engine).__name__ == "CachedEngine"  # the same predictor, over an engine without torch
    assert same(light.fingerprint()) == same(torch_side.fingerprint())  # one resume fingerprint
    assert light.overlap == torch_side.overlap and light.engine.runs((128, 128))
    for refused in (dict(scales=(1.0, 1.5)), dict(flip=True), dict(turns=True), dict(compile=True), dict(engine="torch"),
                    dict(device="cuda"), dict(precision="fp16")):
        assert warm_start(str(tiny_checkpoint), Settings(**{**settings, **refused})) is None, refused
    assert warm_start(str(tmp_path / "other.pt"), Settings(**settings)) is None


def test_a_large_image_goes_to_the_torch_predictors_stitching_with_the_same_labels(tmp_path, tiny_checkpoint,
                                                                                   monkeypatch):
    from bigseg.infer.engines import cached
    from bigseg.infer.start import model_engine
    from bigseg.run.file_job import predict_file
    from tests.conftest import write_geotiff

    monkeypatch.setenv("BIGSEG_CACHE", str(tmp_path / "cache"))
    src = write_geotiff(tmp_path / "a.tif", 300, 200)
    ckpt = load_checkpoint(tiny_checkpoint)
    make = lambda: Predictor(ckpt, "cpu", "fp32", tile=128, engine="openvino")
    reference = predict_file(make(), src, tmp_path / "torch.tif")  # exports, keeps the card
    monkeypatch.setattr(cached, "MAX_PIXELS", 10_000)
    settings = Settings("cpu", "fp32", 128, engine="openvino")
    built = []
    light = Predictor.running(lambda note: cached.CachedEngine(
        warm_start(str(tiny_checkpoint), settings), "openvino",
        lambda: built.append(1) or model_engine(str(tiny_checkpoint), settings, note)), settings)
    result = predict_file(light, src, tmp_path / "light.tif")
    import rasterio

    a, b = (rasterio.open(p).read(1) for p in (reference.output, result.output))
    assert built == [1] and np.array_equal(a, b)


def test_the_warm_start_takes_a_runtime_unless_torch_wins_back_its_start_up():
    """Timing of a tile: torch 0.10 s, OpenVINO 0.13 s. A photo (one tile) starts faster without
    torch; 200 tiles of it would not (0.03 s x 200 > torch's start-up)."""
    from bigseg.infer.choose import TORCH_START_S, warm_choice

    timing = {"torch": 0.10, "openvino": 0.13, "onnx": 0.25}
    assert warm_choice(timing, (384, 512), tiles=1) == "openvino"
    assert warm_choice(timing, (384, 512), tiles=200) is None
    assert 200 * 0.03 > TORCH_START_S
    assert warm_choice({"torch": 0.10, "openvino": 0.13}, (384, 512), tiles=1) == "openvino"  # onnx not timed
    assert warm_choice({"torch": 0.5, "openvino": 0.3, "onnx": 0.4}, (1024, 1024), tiles=500) == "openvino"
    assert warm_choice({"openvino": 0.3}, (64, 64), tiles=1) is None  # no torch timing: not timed here


def test_dry_run_says_the_engine_and_why(tiny_checkpoint, tmp_path, monkeypatch):
    from bigseg.infer.engines.exported import ExportedModel
    from bigseg.run.plan import describe_engine

    monkeypatch.setenv("BIGSEG_CACHE", str(tmp_path))
    ckpt = load_checkpoint(tiny_checkpoint)
    predictor = Predictor(ckpt, "cpu", "fp32", tile=128, engine="auto")
    assert "torch (float32) at first" in describe_engine(predictor, (100, 120), (120, 100))
    predictor.engine.model.export_after = 0.0  # as for a shipped model
    assert "exported for" in describe_engine(predictor, (100, 120), (120, 100))
    predictor.scores(np.zeros((3, 100, 120), np.float32))  # exports, times
    said = describe_engine(predictor, (100, 120), (120, 100))
    assert "a tile" in said and ("timed on this machine" in said or "without torch" in said)
    monkeypatch.setattr(ExportedModel, "failure", lambda self, shape: "forced")
    assert "does not export (forced)" in describe_engine(predictor, (100, 120), (120, 100))


def test_models_prepare_exports_and_times_each_size_so_the_next_run_starts_without_torch(
        tiny_checkpoint, tmp_path, monkeypatch, capsys):
    from tests.cli_helpers import run_cli

    monkeypatch.setenv("BIGSEG_CACHE", str(tmp_path / "cache"))
    code, out, err = run_cli(capsys, "models", "--prepare", tiny_checkpoint, "--size", "64x80")
    assert code == 0, err
    assert "preparing" in err and "64x80: " in out
    records = [json.loads(p.read_text()) for p in (tmp_path / "cache" / "onnx").glob("*.json")
               if p.name != "export-seconds"]
    assert len(records) == 1 and records[0]["timings"]  # exported (64 x 128 padded) and timed here
    code, _, err = run_cli(capsys, "models", "--prepare", tiny_checkpoint, "--size", "64by80")
    assert code == 1 and "--size takes HEIGHTxWIDTH" in err
