"""A warm start without torch: once the torch predictor has exported a model for OpenVINO (and, for
auto, timed it here), `bigseg predict` runs from the cache without importing torch, with the same
labels, the same resume fingerprint, and the torch predictor for anything the cache lacks."""
import json
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

from bigseg.checkpoint import load_checkpoint
from bigseg.infer.choose import warm_start
from bigseg.infer.predictor import Predictor
from bigseg.infer.settings import Settings
from bigseg.infer.start import open_predictor

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


def test_a_cached_export_predicts_without_torch_with_the_same_labels(tmp_path, tiny_checkpoint):
    image = np.random.default_rng(0).integers(0, 255, (90, 120, 3)).astype(np.uint8)
    cv2.imwrite(str(tmp_path / "a.png"), image)
    cv2.imwrite(str(tmp_path / "b.png"), image[:70, :100])  # pads to the same 128 x 128 tiles
    cv2.imwrite(str(tmp_path / "c.png"), np.tile(image, (2, 2, 1)))  # another tile shape: not cached yet
    cache = tmp_path / "cache"
    common = ["--model", tiny_checkpoint, "--device", "cpu", "--engine", "openvino", "--tile", "256", "--probs"]
    first, err = predict([tmp_path / "a.png", "-o", tmp_path / "first", *common], cache)
    assert first == "TORCH" and "exporting the model for OpenVINO" in err  # the torch predictor exports
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


def test_auto_starts_without_torch_only_where_this_machine_chose_openvino(tmp_path, tiny_checkpoint, monkeypatch):
    image = np.random.default_rng(1).integers(0, 255, (64, 64, 3)).astype(np.uint8)
    cv2.imwrite(str(tmp_path / "a.png"), image)
    cache = tmp_path / "cache"
    monkeypatch.setenv("BIGSEG_CACHE", str(cache))
    common = ["--model", tiny_checkpoint, "--device", "cpu", "--tile", "64"]
    predict([tmp_path / "a.png", "-o", tmp_path / "o1", "--engine", "openvino", *common], cache)  # exported, not timed
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
    for refused in (dict(scales=(1.0, 1.5)), dict(flip=True), dict(compile=True), dict(engine="torch"),
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
