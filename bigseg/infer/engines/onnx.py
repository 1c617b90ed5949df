"""ONNX Runtime: runs the model's ONNX export on the CPU in fp32 (it also serves Windows on arm64,
where OpenVINO has no wheels)."""
from __future__ import annotations

from pathlib import Path

from bigseg.infer.engines.base import Compiled, Runtime, register_runtime


def open_export(path: Path, precision: str, threads: int, compiled_cache: Path | None) -> Compiled:
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


ONNX_RUNTIME = register_runtime(Runtime("onnx", "ONNX Runtime", "onnxruntime", "onnxruntime", open_export))
