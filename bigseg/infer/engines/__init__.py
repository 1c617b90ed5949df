"""Tile engines (`base`: the `TileEngine` protocol and the registries): `torch` (the model itself,
any device), the exported runtimes `openvino` and `onnx` (registered on import, in the order
`auto` tries them), and `cached` (cached exports without torch). `export` makes and keeps the
exports; `exported` runs them inside a torch run, choosing per tile shape."""
from bigseg.infer.engines import openvino  # noqa: F401, I001  (registers OpenVINO first: auto's first choice)
from bigseg.infer.engines import onnx  # noqa: F401  (registers ONNX Runtime)
from bigseg.infer.engines.base import RUNTIMES, Runtime, TileEngine, engine_names, register_engine, register_runtime

__all__ = ["RUNTIMES", "Runtime", "TileEngine", "engine_names", "register_engine", "register_runtime"]
