"""The one predictor: a model, through its tile engine (`bigseg.infer.engines`), as the tiling's
`predict(batch)` with out-of-memory back-off; in-memory images (`scores`, `segment`) go through the
same tiling as files (`stream`; files are the run package's business, `bigseg.run.file_job`).
No torch here: the engine decides where the numbers live."""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import numpy as np

from bigseg.errors import InputError
from bigseg.infer.card import ModelCard
from bigseg.infer.engines.base import BUILDERS, TileEngine
from bigseg.infer.notes import Notes
from bigseg.infer.settings import DEFAULT_BATCH, DEFAULT_TILE, Settings
from bigseg.palette import NODATA
from bigseg.tiling.geometry import TileGrid, choose_overlap, default_overlap
from bigseg.tiling.stitch import NUMPY, Pipeline, stream_tiles


@dataclass(frozen=True)
class Finished:
    """What each finished rectangle becomes on the engine's arrays, on its way to the host: uint8
    labels (and uint8 probabilities p x 255 with `probs`), or with `labels` False the scores."""

    probs: bool = False
    averaged: bool = False
    labels: bool = True

    def on(self, arrays: Any) -> Callable:
        def finish(window, block, valid):
            if not self.labels:
                return window, arrays.host({"scores": block}), valid
            out = {"labels": arrays.labels(block)}
            if self.probs:
                out["probs"] = arrays.probabilities(block, self.averaged)
            return window, arrays.host(out), valid
        return finish


def build_engine(checkpoint: Any, settings: Settings, note: Callable[[str], None]) -> TileEngine:
    """The engine the settings name for a checkpoint: a registered one, else torch (with its
    exported runtimes)."""
    if settings.engine in BUILDERS:
        return BUILDERS[settings.engine](checkpoint, settings, note)
    from bigseg.infer.engines.torch import TorchEngine  # torch is imported only for a torch run

    return TorchEngine(checkpoint, settings, note)


class Predictor(Notes):
    """A trained model ready to predict tiles of images (the CLI's `predict` and `eval` use it).
    `model`: a checkpoint (`bigseg.checkpoint.Checkpoint`); the rest are the run's `Settings`,
    checked here once. `Predictor.running(make_engine, settings)` runs the engine that
    `make_engine(note)` makes (the warm start without torch, `bigseg.infer.start`)."""

    def __init__(self, model: Any, device: str = "auto", precision: str = "auto", tile: int = DEFAULT_TILE,
                 overlap: int | None = None, batch_size: int = DEFAULT_BATCH, scales: tuple[float, ...] = (1.0,),
                 flip: bool = False, crf: Any = None, compile: bool = False, engine: str | None = None,
                 on_note: Callable[[str], None] | None = None, threads: int | None = None, turns: bool = False):
        settings = Settings(device, precision, tile, overlap, batch_size, tuple(scales), flip, crf, compile, engine,
                            threads, turns)
        self._start(settings, on_note)
        self._run(build_engine(model, settings, self.note))

    @classmethod
    def running(cls, make_engine: Callable[[Callable[[str], None]], TileEngine], settings: Settings,
                on_note: Callable[[str], None] | None = None) -> "Predictor":
        predictor = cls.__new__(cls)
        predictor._start(settings, on_note)
        predictor._run(make_engine(predictor.note))  # the engine speaks through the predictor's notes
        return predictor

    def _start(self, settings: Settings, on_note: Callable[[str], None] | None) -> None:
        self.settings = settings
        self.notes: list[str] = []  # things said once per run (e.g. out-of-memory back-off)
        self.on_note = on_note      # hears each note when it is first said
        self.fitting_batch: int | None = None

    def _run(self, engine: TileEngine) -> None:
        self.engine = engine
        s = self.settings
        self.overlap, self.overlap_from = choose_overlap(s.overlap, self.card.context_margin, s.tile)
        self.fill = np.asarray(self.card.normalization.mean, np.float32).reshape(-1, 1, 1)

    # --- what it is -----------------------------------------------------------------------------

    @property
    def card(self) -> ModelCard:
        return self.engine.card

    @property
    def num_classes(self) -> int:
        return self.card.num_classes

    @property
    def device(self) -> str:
        return self.engine.device

    @property
    def on_gpu(self) -> bool:
        return self.engine.device.startswith("cuda")

    @property
    def precision(self) -> str:
        return self.engine.precision

    tile = property(lambda self: self.settings.tile)
    batch_size = property(lambda self: self.settings.batch_size)
    scales = property(lambda self: self.settings.scales)
    flip = property(lambda self: self.settings.flip)
    turns = property(lambda self: self.settings.turns)
    crf = property(lambda self: self.settings.crf)

    @property
    def averages_probabilities(self) -> bool:
        """Several scales, flips or a CRF: tiles give probabilities instead of logits."""
        return self.settings.averages_probabilities

    def fingerprint(self) -> dict[str, Any]:
        """Everything of the model side that shapes a prediction (for a resume fingerprint: a run
        interrupted with one engine resumes with another that computes the same)."""
        card, s = self.card, self.settings
        return {"weights": card.weights, "arch": card.arch, "config": card.config, "classes": card.classes,
                "tile": s.tile, "overlap": self.overlap, "scales": s.scales, "flip": s.flip,
                **({"turns": True} if s.turns else {}),  # without: as fingerprints were before turns
                "crf": None if s.crf is None else vars(s.crf), "precision": f"torch.{self.precision}",
                "device": self.device.split(":")[0], "engine": self.engine.name}

    # --- one batch ------------------------------------------------------------------------------

    def predict(self, batch: np.ndarray, engine: TileEngine | None = None) -> Any:
        """(n, bands, h, w) image values in 0..255 -> (n, classes, h, w) float32 scores on the
        engine's arrays (logits, or probabilities with several scales, flips or a CRF). Returns
        without waiting for the device.

        Out-of-memory back-off: a batch that does not fit is split in halves (and later batches
        stay at the size that fit), down to one tile; a single tile that does not fit is predicted
        in sub-tiles of half its side with the same overlap rules. Tiles are independent, so a
        halved batch gives the same result as that batch size from the start."""
        engine = engine or self.engine
        n = len(batch)
        step = min(n, self.fitting_batch or n)
        out, i = [], 0
        while i < n:
            chunk = batch[i:i + step]
            try:
                out.append(engine.scores(chunk))
                i += len(chunk)
            except Exception as e:  # each engine reports exhausted memory in its own types
                if not engine.out_of_memory(e):
                    raise
                if step > 1:
                    step //= 2
                    self.fitting_batch = step
                    self.note(f"out of memory with {2 * step} tiles per batch: continuing with {step}")
                else:
                    out.append(engine.arrays.from_numpy(self._in_subtiles(engine, chunk)))
                    i += 1
        return out[0] if len(out) == 1 else engine.arrays.concatenate(out)

    def _in_subtiles(self, engine: TileEngine, one: np.ndarray) -> np.ndarray:
        """Predict one (1, bands, h, w) tile that does not fit through a grid of half-size tiles."""
        _, _, h, w = one.shape
        side = max(h, w) // 2
        if side < 32:
            raise InputError("out of memory even for 32-pixel tiles; use the CPU or a smaller model")
        overlap = default_overlap(self.card.context_margin, side)
        self.note(f"out of memory with one {max(h, w)}-pixel tile: predicting it in {side}-pixel sub-tiles "
                  f"(overlap {overlap})")
        out = np.zeros((1, self.num_classes, h, w), np.float32)
        valid = np.ones((h, w), bool)
        read = lambda win: (one[0][(slice(None), *win.slices)], valid[win.slices])
        predict = lambda x: engine.arrays.numpy(self.predict(x, engine))
        pipeline = Pipeline(predict, self.num_classes, self.fill, 1, NUMPY)
        for window, block, _ in stream_tiles(TileGrid(w, h, side, overlap), read, pipeline):
            if block is not None:
                out[(0, slice(None), *window.slices)] = block
        return out

    # --- tiling ---------------------------------------------------------------------------------

    def grid(self, width: int, height: int) -> TileGrid:
        return TileGrid(width, height, self.settings.tile, self.overlap)

    def labels_and_probabilities(self, probs: bool) -> Finished:
        """A `finish` for writing: on the engine's device, a finished rectangle's scores become
        uint8 labels (and uint8 probabilities with `probs`), whose copy to the host starts at once;
        the float scores never leave the device."""
        return Finished(probs, self.averages_probabilities)

    def stream(self, grid: TileGrid, read: Callable, finish: Finished | Callable | None = None, prefetch: int = 0,
               **options: Any) -> Iterator[Any]:
        """`bigseg.tiling.stitch.stream_tiles` with this model (options: rows, on_tile, seams);
        scores are blended where the engine computes them, `finish` applied there."""
        engine = self.engine.for_grid(grid)
        if isinstance(finish, Finished):
            finish = finish.on(engine.arrays)
        pipeline = Pipeline(lambda batch: self.predict(batch, engine), self.num_classes, self.fill,
                            self.settings.batch_size, engine.arrays, finish, engine.lookahead, prefetch)
        return stream_tiles(grid, read, pipeline, **options)

    def scores(self, image: np.ndarray, valid: np.ndarray | None = None) -> np.ndarray:
        """Tiled scores of an in-memory (bands, H, W) image in the model's 0..255 units, exactly as
        files are processed."""
        image = model_image(image, valid, self.card.in_channels, self.note)
        _, h, w = image.shape
        valid = np.ones((h, w), bool) if valid is None else valid
        out = np.zeros((self.num_classes, h, w), np.float32)
        read = lambda win: (image[(slice(None), *win.slices)].astype(np.float32), valid[win.slices])
        for window, copy, *_ in self.stream(self.grid(w, h), read, Finished(labels=False)):
            if copy is not None:  # None: no valid pixel there (scores stay 0)
                out[(slice(None), *window.slices)] = copy.numpy()["scores"]
        return out

    def segment(self, image: np.ndarray, valid: np.ndarray | None = None) -> np.ndarray:
        """Class indices (H, W) uint8 of a (bands, H, W) image in 0..255 units; invalid pixels get 255."""
        labels = self.scores(image, valid).argmax(0).astype(np.uint8)
        if valid is not None:
            labels[~valid] = NODATA
        return labels


def model_image(image: np.ndarray, valid: np.ndarray | None, bands: int, note: Callable[[str], None]) -> np.ndarray:
    """An in-memory image as the model takes it, or an InputError that says how to pass it: a
    (bands, H, W) array of the model's band count in 0..255 units. A float image in 0..1 is
    scaled to 0..255, with a warning and a note."""
    image = np.asarray(image)
    shape = "x".join(map(str, image.shape))
    if image.ndim == 2:
        raise InputError(f"takes (bands, height, width); got a 2-D {shape} array: one band is image[None]"
                         + (f", repeated to the model's {bands}: np.repeat(image[None], {bands}, 0)" if bands > 1 else ""),
                         param="image")
    if image.ndim != 3:
        raise InputError(f"takes (bands, height, width); got a {image.ndim}-D {shape} array", param="image")
    if image.shape[0] != bands:
        hint = ("; it looks like (height, width, bands): pass np.moveaxis(image, -1, 0)"
                if image.shape[-1] == bands else "")
        raise InputError(f"has {image.shape[0]} band(s) first ({shape}); the model takes {bands}{hint}",
                         param="image")
    if valid is not None and np.shape(valid) != image.shape[1:]:
        raise InputError(f"is {'x'.join(map(str, np.shape(valid)))}; the image is {image.shape[1]}x{image.shape[2]}",
                         param="valid")
    if image.dtype.kind not in "uif":
        raise InputError(f"holds {image.dtype} values; the model takes numbers in 0..255", param="image")
    if image.dtype.kind == "f" and image.size and 0 < np.nanmax(image) <= 1.0 and np.nanmin(image) >= 0.0 \
            and not np.array_equal(image, np.round(image)):  # fractions: not 8-bit values cast to float
        message = ("the image's values lie in 0..1; the model takes 0..255 (8-bit units, normalised inside): "
                   "scaled by 255")
        warnings.warn(message, UserWarning, stacklevel=4)
        note(message)
        image = image * np.float32(255)
    return image
