"""What every tile engine is, and the registries that make a new one a single module.

A `TileEngine` runs one model on batches of tiles for the predictor (`bigseg.infer.predictor`),
which knows nothing else of it: torch (`engines.torch`, any device, every option) and the
torch-free engine of cached exports (`engines.cached`) implement it.

An exported runtime runs the model's ONNX export (`engines.export`) on the CPU: OpenVINO
(`engines.openvino`) and ONNX Runtime (`engines.onnx`) each register one `Runtime` here, and
`--engine NAME` and `auto`'s timing race then know it. A runtime that reads ONNX is one module that
calls `register_runtime`; an engine that does not is one module that calls `register_engine` with a
function building its `TileEngine`.
"""
from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Protocol

import numpy as np

# how torch, OpenVINO and ONNX Runtime word exhausted memory (each in its own exception type)
OUT_OF_MEMORY = ("can't allocate memory", "out of memory", "failed to allocate memory", "bad allocation")
# an opened export: normalised (n, bands, h, w) float32 -> (n, classes, h, w) logits
Compiled = Callable[[np.ndarray], np.ndarray]


class TileEngine(Protocol):
    """A model running on tiles. `name` is the engine as the run's settings record it; `device`
    ("cpu", "cuda:0") and `precision` ("float32", "bfloat16", "float16") where it computes;
    `arrays` the stitcher's array namespace of its scores (`bigseg.tiling.stitch`), with
    `labels`, `probabilities` and `host` for finished rectangles; `lookahead` the batches queued
    before a result is taken (1 where the device runs on by itself)."""

    name: str
    device: str
    precision: str
    arrays: Any
    lookahead: int

    def scores(self, batch: np.ndarray) -> Any:
        """(n, bands, h, w) image values in 0..255 -> (n, classes, h, w) scores on `arrays`: logits,
        or the mean probabilities where the settings average scales, flips or a CRF."""

    def out_of_memory(self, error: BaseException) -> bool:
        """Whether `error` says the device ran out of memory (the predictor then halves its batch)."""

    def for_grid(self, grid: Any) -> "TileEngine":
        """The engine that runs an image of this tile grid (`bigseg.tiling.geometry.TileGrid`): itself,
        or another it hands such images to."""

    def expected_runtime(self, shape: tuple[int, int]) -> str | None:
        """The exported runtime tiles of `shape` will run in, as far as is known before running;
        None for torch."""


@dataclass(frozen=True)
class Runtime:
    """An exported runtime: `name` is its `--engine` value, `label` its name in messages, `package`
    what `pip install` takes and `module` what it imports; `open(path, precision, threads, cache)`
    opens the ONNX export at `path` (cache: a folder for its own compiled blobs, or None) at
    "f32" or "bf16"; `bf16`: whether it computes in bf16 on CPUs with bf16 units."""

    name: str
    label: str
    package: str
    module: str
    open: Callable[[Path, str, int, Path | None], Compiled]
    bf16: bool = False

    def available(self) -> bool:
        return importlib.util.find_spec(self.module) is not None


RUNTIMES: dict[str, Runtime] = {}
# whole engines that do not read the ONNX export: name -> build(checkpoint, settings, note)
BUILDERS: dict[str, Callable[..., TileEngine]] = {}


def register_runtime(runtime: Runtime) -> Runtime:
    RUNTIMES[runtime.name] = runtime
    return runtime


def register_engine(name: str, build: Callable[..., TileEngine]) -> None:
    """`build(checkpoint, settings, note)` makes the engine `--engine name` runs."""
    BUILDERS[name] = build


def engine_names() -> tuple[str, ...]:
    return ("auto", "torch", *RUNTIMES, *BUILDERS)


def label(name: str) -> str:
    """An engine's name as messages say it."""
    return RUNTIMES[name].label if name in RUNTIMES else name
