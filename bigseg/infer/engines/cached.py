"""The engine of a warm start without torch: a model already exported (`engines.export`) runs from
bigseg's cache alone, through OpenVINO or ONNX Runtime, in numpy. Importing torch takes longer than
predicting a small image, so a plain CPU run (one scale, no flip, no CRF, no torch.compile) whose
model card (`bigseg.infer.card`) and exports are cached starts here (`bigseg.infer.choose.warm_start`);
`auto` only where this machine's timing chose an exported runtime. A tile shape the cache does not
hold, and an image larger than `MAX_PIXELS`, go to the torch engine, built (and torch imported)
only then: the labels are the same (fp32 equal; probabilities within 1/255).
"""
from __future__ import annotations

from typing import Any, Callable

import numpy as np

from bigseg.infer.cache import machine
from bigseg.infer.card import ModelCard
from bigseg.infer.choose import MAX_PIXELS, WarmStart, warm_choice
from bigseg.infer.engines.base import OUT_OF_MEMORY, RUNTIMES, Compiled
from bigseg.infer.engines.export import ExportCache, Shape
from bigseg.tiling.geometry import TileGrid
from bigseg.tiling.stitch import NUMPY


class CachedEngine:
    """`engine`: the settings' engine (auto, openvino or onnx); `torch_engine()` builds the torch
    engine with the same settings, for what the cache does not hold."""

    device, lookahead = "cpu", 0
    arrays = NUMPY

    def __init__(self, warm: WarmStart, engine: str, torch_engine: Callable[[], Any]):
        self.card: ModelCard = warm.card
        self.name, self.runtime_precision, self.threads = engine, warm.precision, warm.threads
        self.precision = "bfloat16" if warm.precision == "bf16" else "float32"
        self.cache = ExportCache(self.card.identity, self.card.in_channels)
        self._compiled: dict[Shape, Compiled | None] = {}
        self._torch_engine, self._torch = torch_engine, None
        self.tiles: int | None = None  # tiles of the image being run (the warm start's choice weighs them)
        norm = self.card.normalization
        self._mean = np.asarray(norm.mean, np.float32).reshape(1, -1, 1, 1)
        self._std = np.asarray(norm.std, np.float32).reshape(1, -1, 1, 1)

    def runs(self, shape: Shape) -> bool:
        """Whether tiles of `shape` (h, w) run here (cached, and for auto chosen on this machine)."""
        return self._model(self.card.padded(shape)) is not None

    def _model(self, shape: Shape) -> Compiled | None:
        if shape not in self._compiled:
            self._compiled[shape] = self._load(shape)
        return self._compiled[shape]

    def _load(self, shape: Shape) -> Compiled | None:
        """The compiled export of `shape` from the cache, checked as the torch engine checks it, or
        None (not exported, damaged, or for auto: not timed here or slower than torch here)."""
        runtime = self.name
        if runtime == "auto":  # the runtime this machine's timing chose (None: torch's)
            timing = self.cache.recorded_timing(shape, machine(self.threads, self.runtime_precision))
            runtime = warm_choice(timing, shape, self.tiles)
            if runtime is None:
                return None
        if not self.cache.path(shape).is_file() or not self.cache.intact(shape):
            return None  # the torch engine says what is wrong and exports it again
        try:
            return RUNTIMES[runtime].open(self.cache.path(shape), self.runtime_precision, self.threads,
                                          self.cache.compiled)
        except Exception:  # the runtime cannot load it: the torch engine says so and exports it again
            return None

    def scores(self, batch: np.ndarray) -> np.ndarray:
        """(n, bands, h, w) image values -> (n, classes, h, w) float32 logits."""
        h, w = batch.shape[-2:]
        shape = self.card.padded((h, w))
        compiled = self._model(shape)
        if compiled is None:  # a shape the cache does not hold: the torch engine's
            return self.torch().scores(batch).cpu().numpy()
        x = (batch.astype(np.float32) - self._mean) / self._std
        ph, pw = shape[0] - h, shape[1] - w
        if ph or pw:  # as the models pad (bigseg.models.blocks.pad_to_multiple)
            x = np.pad(x, ((0, 0), (0, 0), (0, ph), (0, pw)), mode="reflect" if ph < h and pw < w else "edge")
        return np.ascontiguousarray(np.asarray(compiled(x))[..., :h, :w], np.float32)

    def torch(self):
        """The torch engine with the same settings (torch imported now)."""
        if self._torch is None:
            self._torch = self._torch_engine()
        return self._torch

    def out_of_memory(self, error: BaseException) -> bool:
        return any(m in str(error).lower() for m in OUT_OF_MEMORY)

    def for_grid(self, grid: TileGrid):
        """Itself; a large image goes to the torch engine's stitching (on its arrays)."""
        self.tiles = len(grid)
        if grid.width * grid.height > MAX_PIXELS:
            return self.torch().for_grid(grid)
        return self

    def expected_runtime(self, shape: Shape) -> str | None:
        return self.name if self.name != "auto" else None
