"""A warm start without torch: a model already exported (`bigseg.engines`) predicts from bigseg's
cache alone, through OpenVINO or ONNX Runtime. Importing torch takes longer than predicting a small image, so
a `bigseg predict` whose model, tile shapes and precision are in the cache runs here: the model's
card (what its checkpoint says: classes, palette, normalisation, padding multiple, ...), written
by the torch predictor the first time, and the compiled export. The tiling, stitching, outputs and
resume are the torch predictor's own (`bigseg.tiling`, `bigseg.run`), with numpy arrays; a tile
shape that is not cached goes to the torch predictor, built (and torch imported) only then.

Only the plain case runs here: the CPU, one scale, no flip, no CRF, no torch.compile, the
`openvino`, `onnx` or `auto` engine (auto only where a timing of this machine chose one of them);
anything else is the torch predictor's from the start.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from bigseg.atomic import write_text
from bigseg.cache import cache_dir, default_threads, export_key, machine
from bigseg.compiled import RUNTIMES, available, open_export
from bigseg.geometry import TileGrid, Window, choose_overlap
from bigseg.manifest import find_entry, sha256, weights_dir
from bigseg.notes import Notes
from bigseg.cache import native_bf16
from bigseg.tiling import NUMPY, Pipeline, stream_tiles

CARDS = "models"
# Larger images go to the torch predictor (torch imported then); up to this size the numpy path was
# as fast or faster where measured (docs/engines.md, the warm start).
MAX_PIXELS = 17_000_000
# Importing torch takes about this long (docs/engines.md, the warm start): below it, an exported
# runtime a little slower than torch per tile still gives the faster command.
TORCH_START_S = 1.3


@dataclass
class Normalisation:
    mean: list[float]
    std: list[float]


@dataclass
class ModelCard:
    """What a checkpoint says of its model, without its weights (and without torch)."""

    arch: str
    config: dict
    classes: list[str]
    palette: list[list[int]]
    normalization: Normalisation
    in_channels: int
    output_multiple: int
    context_margin: int | None
    weights: str  # the weights digest: the identity of the exports
    input: dict = field(default_factory=dict)
    source: str = ""

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def to_dict(self) -> dict:
        return {"arch": self.arch, "config": self.config, "classes": self.classes, "palette": self.palette,
                "normalization": {"mean": self.normalization.mean, "std": self.normalization.std},
                "in_channels": self.in_channels, "output_multiple": self.output_multiple,
                "context_margin": self.context_margin, "weights": self.weights, "input": self.input}

    @classmethod
    def from_dict(cls, d: dict, source: str = "") -> "ModelCard":
        return cls(d["arch"], dict(d["config"]), list(d["classes"]), [list(c) for c in d["palette"]],
                   Normalisation(list(d["normalization"]["mean"]), list(d["normalization"]["std"])),
                   int(d["in_channels"]), int(d["output_multiple"]), d.get("context_margin"), d["weights"],
                   dict(d.get("input") or {}), source)


def model_file(spec: str) -> tuple[Path, str] | None:
    """The file `--model` names and its sha256 (a shipped model's from its manifest), or None."""
    path = Path(spec).expanduser()
    if path.is_file():
        return path, sha256(path)
    entry = find_entry(spec)
    if entry is None or not (weights_dir() / entry["file"]).is_file():
        return None
    return weights_dir() / entry["file"], entry["sha256"]


def write_card(card: ModelCard, file_sha256: str) -> None:
    """Keep `card` for the model file with this digest (by the torch predictor; a read-only cache
    only means no warm start without torch)."""
    try:
        (cache_dir() / CARDS).mkdir(parents=True, exist_ok=True)
        write_text(cache_dir() / CARDS / f"{file_sha256}.json", json.dumps(card.to_dict()))
    except OSError:
        pass


def read_card(file_sha256: str, source: str) -> ModelCard | None:
    try:
        return ModelCard.from_dict(json.loads((cache_dir() / CARDS / f"{file_sha256}.json").read_text()), source)
    except (OSError, ValueError, KeyError, TypeError):
        return None


def cpu_precision(precision: str) -> str | None:
    """OpenVINO's precision for `--precision` on the CPU (as `bigseg.device.resolve_precision`
    decides it), or None where only torch can say what it means."""
    if precision == "auto":
        precision = os.environ.get("BIGSEG_PRECISION") or "auto"
    if precision == "auto":
        return "bf16" if native_bf16() else "f32"
    return {"fp32": "f32", "bf16": "bf16"}.get(precision)


def warm_choice(timing: Any, shape: tuple[int, int], tiles: int | None = None) -> str | None:
    """The exported runtime a warm start uses for `tiles` tiles of `shape` (None: as many as the
    largest image run here, `MAX_PIXELS`) given this machine's timing of one tile in each engine
    (`bigseg.engines`), or None for the torch predictor: the fastest exported runtime, unless
    torch is so much faster per tile that over those tiles it gains back its start-up."""
    if not isinstance(timing, dict) or not isinstance(timing.get("torch"), (int, float)):
        return None
    exported = [r for r in RUNTIMES if available(r) and isinstance(timing.get(r), (int, float))]
    if not exported:
        return None
    best = min(exported, key=timing.get)
    tiles = tiles if tiles is not None else math.ceil(MAX_PIXELS / (shape[0] * shape[1]))
    return None if (timing[best] - timing["torch"]) * tiles > TORCH_START_S else best


class Arrays(dict):
    """Finished arrays already on the host (the stitcher's `HostCopy` without a device)."""

    def numpy(self) -> dict[str, np.ndarray]:
        return self


class ExportedPredictor(Notes):
    """The predictor of `bigseg.run`'s file jobs for an exported model, in numpy: the torch
    predictor's interface, its results (fp32 labels equal; probabilities within 1/255)."""

    def __init__(self, card: ModelCard, precision: str, tile: int, overlap: int | None, batch_size: int,
                 threads: int, engine: str, fallback: Callable[[], Any], on_note: Callable[[str], None] | None):
        self.checkpoint, self.precision, self.threads = card, precision, threads
        self.auto, self.runtime = engine == "auto", engine
        self.tile, self.batch_size = tile, batch_size
        self.overlap, self.overlap_from = choose_overlap(overlap, card.context_margin, tile)
        self.scales, self.flip, self.crf = (1.0,), False, None
        self.device = _Cpu()
        self.dtype = "torch.bfloat16" if precision == "bf16" else "torch.float32"
        self.fill = np.asarray(card.normalization.mean, np.float32).reshape(-1, 1, 1)
        self._mean = self.fill.reshape(1, -1, 1, 1)
        self._std = np.asarray(card.normalization.std, np.float32).reshape(1, -1, 1, 1)
        self.engine = _EngineName(engine)
        self.weights_digest = card.weights
        self.notes: list[str] = []
        self.on_note = on_note
        self._compiled: dict[tuple[int, int], Any] = {}
        self._fallback, self._torch = fallback, None
        self._probs = False
        self.tiles: int | None = None  # tiles of the image being run (the warm start's choice weighs them)

    @property
    def num_classes(self) -> int:
        return self.checkpoint.num_classes

    @property
    def averages_probabilities(self) -> bool:
        return False

    def runs(self, shape: tuple[int, int]) -> bool:
        """Whether tiles of `shape` (h, w) run here (compiled and, for auto, chosen on this machine)."""
        return self._model(self._padded(shape)) is not None

    def _padded(self, shape: tuple[int, int]) -> tuple[int, int]:
        m = self.checkpoint.output_multiple
        return -(-shape[0] // m) * m, -(-shape[1] // m) * m

    def _model(self, shape: tuple[int, int]):
        if shape not in self._compiled:
            self._compiled[shape] = self._load(shape)
        return self._compiled[shape]

    def _load(self, shape: tuple[int, int]):
        """The compiled export of `shape` from the cache, checked as the torch engine checks it, or
        None (not exported, damaged, or for auto: not timed here or slower than torch here)."""
        card = self.checkpoint
        key = export_key({"weights": card.weights, "arch": card.arch, "config": card.config}, shape, card.in_channels)
        folder = cache_dir() / "onnx"
        path, meta = folder / f"{key}.onnx", folder / f"{key}.json"
        try:
            record = json.loads(meta.read_text())
        except (OSError, ValueError):
            return None
        runtime = self.runtime
        if self.auto:  # the runtime this machine's timing chose (torch: the torch predictor's)
            timing = record.get("timings", {}).get(machine(self.threads, self.precision))
            runtime = warm_choice(timing, shape, self.tiles)
            if runtime is None:
                return None
        if not path.is_file() or record.get("sha256") != sha256(path):
            return None  # the torch engine says what is wrong and exports it again
        try:
            return open_export(path, runtime, self.precision, self.threads, cache_dir() / "openvino")
        except Exception:  # the runtime cannot load it: the torch engine says so and exports it again
            return None

    # --- the torch predictor's interface -------------------------------------------------------

    def predict(self, batch: np.ndarray) -> np.ndarray:
        """(n, bands, h, w) image values -> (n, classes, h, w) float32 logits."""
        h, w = batch.shape[-2:]
        shape = self._padded((h, w))
        compiled = self._model(shape)
        if compiled is None:  # a shape the cache does not hold: the torch predictor's
            return self.torch().predict(batch).cpu().numpy()
        x = (batch.astype(np.float32) - self._mean) / self._std
        ph, pw = shape[0] - h, shape[1] - w
        if ph or pw:  # as the models pad (bigseg.models.blocks.pad_to_multiple)
            x = np.pad(x, ((0, 0), (0, 0), (0, ph), (0, pw)), mode="reflect" if ph < h and pw < w else "edge")
        return np.ascontiguousarray(np.asarray(compiled(x))[..., :h, :w], np.float32)

    def torch(self):
        """The torch predictor with the same settings (torch imported now)."""
        if self._torch is None:
            self._torch = self._fallback()
            for n in self._torch.take_notes():
                self.note(n)
        return self._torch

    def grid(self, width: int, height: int) -> TileGrid:
        return TileGrid(width, height, self.tile, self.overlap)

    def labels_and_probabilities(self, probs: bool) -> Callable:
        self._probs = probs  # what a large image's torch stitching finishes with too

        def finish(window: Window, block: np.ndarray, valid: np.ndarray):
            out = Arrays(labels=NUMPY.labels(block))
            if probs:
                e = np.exp(block - block.max(0, keepdims=True))
                out["probs"] = np.round(e / e.sum(0, keepdims=True) * 255).astype(np.uint8)
            return window, out, valid
        return finish

    def stream(self, grid: TileGrid, read: Callable, finish: Callable | None = None, prefetch: int = 0,
               **options: Any):
        self.tiles = len(grid)
        if grid.width * grid.height > MAX_PIXELS:  # a large image: the torch predictor's stitching
            torch_side = self.torch()
            return torch_side.stream(grid, read, torch_side.labels_and_probabilities(self._probs), prefetch, **options)
        pipeline = Pipeline(self.predict, self.num_classes, self.fill, self.batch_size, NUMPY, finish, 0, prefetch)
        return stream_tiles(grid, read, pipeline, **options)

    def settings(self) -> dict[str, Any]:
        """As the torch predictor's: a run interrupted there resumes here, and the other way round."""
        card = self.checkpoint
        return {"weights": card.weights, "arch": card.arch, "config": card.config, "classes": card.classes,
                "tile": self.tile, "overlap": self.overlap, "scales": self.scales, "flip": self.flip, "crf": None,
                "precision": self.dtype, "device": "cpu", "engine": self.engine.name}


class _Cpu:
    type = "cpu"

    def __str__(self) -> str:
        return "cpu"


class _EngineName:
    def __init__(self, name: str):
        self.name = name


def exported_predictor(model: str, device: str, precision: str, tile: int, overlap: int | None, batch_size: int,
                       scales: tuple[float, ...], flip: bool, crf: Any, compile: bool, engine: str,
                       threads: int | None, fallback: Callable[[], Any],
                       on_note: Callable[[str], None] | None = None) -> ExportedPredictor | None:
    """The predictor without torch where the run is the plain case and its model card is cached;
    else None (the caller builds the torch predictor)."""
    if device not in ("auto", "cpu") or engine not in ("auto", *RUNTIMES) or scales != (1.0,) or flip or crf or compile:
        return None
    if device == "auto" and _has_cuda():
        return None
    if tile < 16 or batch_size < 1:
        return None  # the torch predictor says what is wrong
    precision = cpu_precision(precision)
    found = model_file(model)
    if precision is None or found is None or (engine != "auto" and not available(engine)):
        return None
    card = read_card(found[1], str(found[0]))
    if card is None:
        return None
    return ExportedPredictor(card, precision, tile, overlap, batch_size, threads or default_threads(), engine,
                             fallback, on_note)


def _has_cuda() -> bool:
    """Whether an NVIDIA GPU may be there (auto would pick it): then the torch predictor decides."""
    return any(Path(p).exists() for p in ("/dev/nvidia0", "/proc/driver/nvidia/version")) or \
        bool(os.environ.get("CUDA_VISIBLE_DEVICES"))
