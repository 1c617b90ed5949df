"""Inference engines: the exported engines (OpenVINO, ONNX Runtime) export once per (padded) shape
into the cache and reuse it and OpenVINO's compiled blobs, rebuild a damaged entry, fall back to
torch for a model they cannot export, and predict what torch predicts (tiled equals whole for a
small receptive field through them too); auto times every engine once per shape and machine and
keeps the fastest, and exports only once a shape has run long enough in torch to be worth it; the
precision is bf16 only where the CPU has bf16 units, fp32 when asked."""
import json
import os
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from bigseg.checkpoint import load_checkpoint
from bigseg.infer.engines import export as export_module
from bigseg.infer.engines import exported as exported_module
from bigseg.infer.engines.export import ExportCache
from bigseg.infer.engines.exported import ExportedModel, race
from bigseg.errors import EngineError, InputError
from bigseg.models import create_model
from bigseg.infer.predictor import Predictor
from tests.conftest import TINY_BY_ARCH, small_receptive_field_net, tiled_prediction

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
