"""OpenVINO: runs the model's ONNX export on the CPU, compiled at fp32 or bf16 (always set: OpenVINO
would pick bf16 by itself on a CPU with bf16 units), one stream of the run's threads, its compiled
blobs cached beside the exports so that a warm start does not compile again."""
from __future__ import annotations

import contextlib
import os
from pathlib import Path

from bigseg.infer.engines.base import Compiled, Runtime, register_runtime

_CORES: dict[str, object] = {}


def open_export(path: Path, precision: str, threads: int, compiled_cache: Path | None) -> Compiled:
    compiled = compile_export(path, precision, threads, compiled_cache)
    return lambda x: compiled(x)[0]


def compile_export(path: Path, precision: str, threads: int, compiled_cache: Path | None):
    """OpenVINO's compiled model of the export at `path` for the CPU. Compiling from the file lets
    OpenVINO's cache in `compiled_cache` (None: none) skip reading and compiling it on a warm start."""
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


OPENVINO = register_runtime(Runtime("openvino", "OpenVINO", "openvino", "openvino", open_export, bf16=True))
