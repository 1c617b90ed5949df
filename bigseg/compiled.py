"""The runtimes that run cached ONNX exports on the CPU, without torch (the engines of
`bigseg.engines` and the warm start without torch, `bigseg.exported`, share them): OpenVINO
(compiled at fp32 or bf16, its compiled blobs cached) and ONNX Runtime (fp32). Each opened export
is a function from a normalised (n, bands, h, w) float32 array to the logits."""
from __future__ import annotations

import contextlib
import os
from pathlib import Path

_CORES: dict[str, object] = {}
RUNTIMES = ("openvino", "onnx")
NAMES = {"openvino": "OpenVINO", "onnx": "ONNX Runtime", "torch": "torch"}


def available(runtime: str) -> bool:
    import importlib.util

    return importlib.util.find_spec({"openvino": "openvino", "onnx": "onnxruntime"}[runtime]) is not None


def open_export(path: Path, runtime: str, precision: str, threads: int, compiled_cache: Path | None):
    """The export at `path` through `runtime` ("openvino" or "onnx"; ONNX Runtime computes in fp32)."""
    if runtime == "openvino":
        compiled = compile_export(path, precision, threads, compiled_cache)
        return lambda x: compiled(x)[0]
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    # idle threads sleep instead of spinning, like torch's here: less CPU time and no slower alone,
    # far better beside the reader's and writer's threads or any other load
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.log_severity_level = 3
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return lambda x: session.run(None, {"x": x})[0]


def compile_export(path: Path, precision: str, threads: int, compiled_cache: Path | None):
    """OpenVINO's compiled model of the export at `path` for the CPU, at `precision` ("f32" or
    "bf16", always set: OpenVINO would otherwise choose bf16 by itself on a CPU with bf16 units),
    one stream of `threads` threads. Compiling from the file lets OpenVINO's cache in
    `compiled_cache` (None: none) skip reading and compiling the model on a warm start."""
    core = _core(compiled_cache)
    config = {"INFERENCE_PRECISION_HINT": precision, "PERFORMANCE_HINT": "LATENCY", "NUM_STREAMS": "1",
              "INFERENCE_NUM_THREADS": str(threads)}
    compiled = core.compile_model(str(path), "CPU", config)
    if compiled_cache is not None:
        for blob in compiled_cache.glob("*.blob"):  # OpenVINO writes them 0440: a cache may be shared
            shareable(blob)
    return compiled


def _core(compiled_cache: Path | None):
    """One OpenVINO Core per compiled-model cache folder (None: a Core that caches nothing)."""
    import openvino as ov

    key = str(compiled_cache)
    if key not in _CORES:
        core = ov.Core()
        if compiled_cache is not None:
            with contextlib.suppress(OSError):
                compiled_cache.mkdir(parents=True, exist_ok=True)
                core.set_property({"CACHE_DIR": key})
        _CORES[key] = core
    return _CORES[key]


def shareable(path: Path) -> None:
    """Readable by everyone the umask allows (mkstemp makes files 0600, OpenVINO its blobs 0440; a
    cache may be shared)."""
    umask = os.umask(0)
    os.umask(umask)
    with contextlib.suppress(OSError):
        os.chmod(path, (path.stat().st_mode | 0o444) & ~umask & 0o777)
