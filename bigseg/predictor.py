"""A checkpoint on a device, as the tiling engine's `predict(batch)`: normalisation, several scales
and flips, the dense CRF, and out-of-memory back-off. In-memory images go through the same tiling
as files (`scores`, `segment`); files are the run package's business (`bigseg.run.file_job`)."""
from __future__ import annotations

import warnings
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch
import torch.nn.functional as F

from bigseg.cache import record_default_threads
from bigseg.checkpoint import Checkpoint, resolve_model, weights_digest
from bigseg.crf.meanfield import dense_crf
from bigseg.crf.params import CRFParams
from bigseg.device import (
    HostCopy,
    TorchArrays,
    labels_of,
    resolve_device,
    resolve_precision,
)
from bigseg.engines import ExportedEngine, default_engine, make_engine
from bigseg.errors import InputError
from bigseg.exported import ModelCard, Normalisation, write_card
from bigseg.geometry import TileGrid, Window, choose_overlap, default_overlap, stitcher_peak_pixels
from bigseg.manifest import read_manifest, sha256
from bigseg.notes import Notes
from bigseg.tiling import NUMPY, Pipeline, stream_tiles
from bigseg.palette import NODATA

DEFAULT_TILE = 1024
DEFAULT_BATCH = 4


class Predictor(Notes):
    """A trained model ready to predict tiles of images (the CLI's `predict` and `eval` use it)."""

    def __init__(self, checkpoint: Checkpoint, device: str = "auto", precision: str = "auto",
                 tile: int = DEFAULT_TILE, overlap: int | None = None, batch_size: int = DEFAULT_BATCH,
                 scales: tuple[float, ...] = (1.0,), flip: bool = False, crf: CRFParams | None = None,
                 compile: bool = False, engine: str | None = None, on_note: Callable[[str], None] | None = None):
        self.checkpoint = checkpoint
        self.notes: list[str] = []  # things said once per run (e.g. out-of-memory back-off)
        self.on_note = on_note      # hears each note when it is first said
        self.crf = crf
        if not scales or any(not 0.1 <= s <= 4 for s in scales):
            raise InputError(f"must be factors between 0.1 and 4, got {scales}", param="scales")
        self.scales, self.flip = tuple(scales), flip
        self.device = resolve_device(device)
        self.dtype = resolve_precision(precision, self.device)
        if tile < 16:
            raise InputError(f"must be at least 16 pixels, got {tile}", param="tile")
        if batch_size < 1:
            raise InputError(f"must be at least 1, got {batch_size}", param="batch_size")
        self.tile, self.batch_size = tile, batch_size
        # channels-last on both: cuDNN's and oneDNN's convolutions run faster in that layout
        self.model = checkpoint.build_model().to(self.device, memory_format=torch.channels_last)
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True  # tiles share one shape: autotune once
        self._digest: str | None = None
        identity = {"weights": self.weights_digest, "arch": checkpoint.arch, "config": checkpoint.config}
        self.engine = make_engine(engine or default_engine(), self.model, self.device, identity, torch.get_num_threads(),
                                  self.note, "bf16" if self.dtype is torch.bfloat16 else "f32")
        if compile and self.engine.name == "torch":
            self.engine.model = torch.compile(self.model, dynamic=False)
        # scores are blended where they are computed; on a GPU the next batch is queued before
        # the previous one's results are written (see `bigseg.tiling.Pipeline`)
        self.arrays = TorchArrays(self.device)
        self.lookahead = 1 if self.device.type == "cuda" else 0
        self.overlap, self.overlap_from = choose_overlap(overlap, getattr(self.model, "context_margin", None), tile)
        norm = checkpoint.normalization
        self._mean = torch.tensor(norm.mean, dtype=torch.float32, device=self.device).view(1, -1, 1, 1)
        self._std = torch.tensor(norm.std, dtype=torch.float32, device=self.device).view(1, -1, 1, 1)
        self.fill = np.asarray(norm.mean, np.float32).reshape(-1, 1, 1)
        self.fitting_batch: int | None = None
        if self.engine.name != "torch":
            keep_card(self)
            if getattr(self.engine, "choose", False) and shipped(checkpoint):
                # a shipped model is run again and again: its first run prepares the fast engine for
                # its tiles at once, so that every later run of that size starts without torch
                self.engine.export_after = 0.0

    @property
    def num_classes(self) -> int:
        return self.checkpoint.num_classes

    @property
    def averages_probabilities(self) -> bool:
        """Several scales, flips or a CRF: tiles give probabilities instead of logits."""
        return self.scales != (1.0,) or self.flip or self.crf is not None

    # --- one batch ------------------------------------------------------------------------------

    def predict(self, batch: np.ndarray) -> torch.Tensor:
        """The engine's `predict(batch)`: (n, bands, h, w) image values in 0..255 -> (n, classes, h, w)
        float32 logits on the device, or probabilities with several scales, flips or a CRF
        (`averages_probabilities`). Returns without waiting for the device.

        Out-of-memory back-off: a batch that does not fit is split in halves (and later batches
        stay at the size that fit), down to one tile; a single tile that does not fit is predicted
        in sub-tiles of half its side with the same overlap rules. Tiles are independent, so a
        halved batch gives the same result as that batch size from the start."""
        n = len(batch)
        step = min(n, self.fitting_batch or n)
        out, i = [], 0
        while i < n:
            chunk = batch[i:i + step]
            try:
                out.append(self.forward(chunk))
                i += len(chunk)
            except Exception as e:  # torch and ONNX Runtime report exhausted memory in their own types
                if not _out_of_memory(e):
                    raise
                if self.device.type == "cuda":
                    torch.cuda.empty_cache()
                if step > 1:
                    step //= 2
                    self.fitting_batch = step
                    self.note(f"out of memory with {2 * step} tiles per batch: continuing with {step}")
                else:
                    out.append(torch.from_numpy(predict_in_subtiles(self, chunk)).to(self.device))
                    i += 1
        return out[0] if len(out) == 1 else torch.cat(out)

    def forward(self, batch: np.ndarray) -> torch.Tensor:
        """One forward pass (scales, flips, CRF) of a batch; queued on the device, not awaited."""
        host = torch.from_numpy(np.ascontiguousarray(batch))
        if self.device.type == "cuda":  # page-locked staging: the copy runs asynchronously
            image = host.pin_memory().to(self.device, non_blocking=True)
        else:
            image = host
        with torch.inference_mode():
            scores = self._scores(image)
            if self.crf is not None:
                scores = torch.stack([dense_crf(p, im, self.crf) for p, im in zip(scores, image)])
        return scores

    def _scores(self, image: torch.Tensor) -> torch.Tensor:
        """Logits, or with several scales / flips the mean softmax over them (as in DeepLab and
        RefineNet testing: each scaled (and mirrored) copy is predicted, brought back to the tile's
        size, averaged); softmax probabilities when a CRF follows."""
        x = ((image - self._mean) / self._std).contiguous(memory_format=torch.channels_last)
        autocast = (torch.autocast(self.device.type, dtype=self.dtype)
                    if self.dtype is not torch.float32 else nullcontext())
        with torch.inference_mode(), autocast:
            if self.scales == (1.0,) and not self.flip:
                y = self.engine(x).float()
                return y.softmax(1) if self.crf is not None else y
            return multi_scale_probabilities(self.engine, x, self.scales, self.flip)

    # --- tiling ---------------------------------------------------------------------------------

    def grid(self, width: int, height: int) -> TileGrid:
        return TileGrid(width, height, self.tile, self.overlap)

    def pipeline(self, grid: TileGrid, finish: Callable | None = None, prefetch: int = 0) -> Pipeline:
        """This model as the tiling engine's pipeline: scores blended on the device (on the host
        when the stitcher's band would not fit in GPU memory), `finish` applied there."""
        arrays, predict = self.arrays, self.predict
        if not self.blends_on_device(grid):
            arrays = TorchArrays(torch.device("cpu"))
            predict = lambda batch: self.predict(batch).cpu()
            self.note("the stitcher's overlap band would not fit in GPU memory: blending on the host")
        return Pipeline(predict, self.num_classes, self.fill, self.batch_size, arrays, finish, self.lookahead,
                        prefetch)

    def blends_on_device(self, grid: TileGrid) -> bool:
        """Blend on the model's device unless, on a GPU, the stitcher's largest held area would
        take more than half of the free memory (a very wide raster): then on the host."""
        if self.device.type != "cuda":
            return True
        need = stitcher_peak_pixels(grid) * (self.num_classes + 1) * 4
        return need < 0.5 * torch.cuda.mem_get_info(self.device)[0]

    def labels_and_probabilities(self, probs: bool) -> Callable:
        """A `finish` for writing: on the device, a finished rectangle's scores become uint8 labels
        (and uint8 probabilities p x 255 with `probs`), whose copy to the host starts at once; the
        float scores never leave the device."""
        def finish(window: Window, block: torch.Tensor, valid: np.ndarray):
            out = {"labels": labels_of(block)}
            if probs:
                if self.averages_probabilities:
                    p = block / block.sum(0, keepdim=True).clamp_min(1e-12)
                else:
                    p = torch.softmax(block, 0)
                out["probs"] = torch.round(p * 255).to(torch.uint8)
            return window, HostCopy(out), valid
        return finish

    def stream(self, grid: TileGrid, read: Callable, finish: Callable | None = None, prefetch: int = 0,
               **options: Any) -> Iterator[Any]:
        """`bigseg.tiling.stream_tiles` with this model (options: rows, on_tile, seams)."""
        return stream_tiles(grid, read, self.pipeline(grid, finish, prefetch), **options)

    def scores(self, image: np.ndarray, valid: np.ndarray | None = None) -> np.ndarray:
        """Tiled scores of an in-memory (bands, H, W) image in the model's 0..255 units, exactly as
        files are processed."""
        image = model_image(image, valid, self.checkpoint.in_channels, self.note)
        _, h, w = image.shape
        valid = np.ones((h, w), bool) if valid is None else valid
        out = np.zeros((self.num_classes, h, w), np.float32)
        read = lambda win: (image[(slice(None), *win.slices)].astype(np.float32), valid[win.slices])
        finish = lambda window, block, _: (window, HostCopy({"scores": block}))
        for window, copy, *_ in self.stream(self.grid(w, h), read, finish):
            if copy is not None:  # None: no valid pixel there (scores stay 0)
                out[(slice(None), *window.slices)] = copy.numpy()["scores"]
        return out

    def segment(self, image: np.ndarray, valid: np.ndarray | None = None) -> np.ndarray:
        """Class indices (H, W) uint8 of a (bands, H, W) image in 0..255 units; invalid pixels get 255."""
        labels = self.scores(image, valid).argmax(0).astype(np.uint8)
        if valid is not None:
            labels[~valid] = NODATA
        return labels

    # --- what shapes the result -----------------------------------------------------------------

    def settings(self) -> dict[str, Any]:
        """Everything of the model side that shapes a prediction (for a resume fingerprint)."""
        return {"weights": self.weights_digest, "arch": self.checkpoint.arch, "config": self.checkpoint.config,
                "classes": self.checkpoint.classes, "tile": self.tile, "overlap": self.overlap,
                "scales": self.scales, "flip": self.flip, "crf": None if self.crf is None else vars(self.crf),
                "precision": str(self.dtype), "device": self.device.type, "engine": self.engine.name}

    @property
    def weights_digest(self) -> str:
        if self._digest is None:
            self._digest = weights_digest(self.checkpoint)
        return self._digest


def shipped(checkpoint: Checkpoint) -> bool:
    """Whether the checkpoint is one of the installed shipped weights."""
    return bool(checkpoint.file_sha256) and any(e.get("sha256") == checkpoint.file_sha256 for e in read_manifest())


def prepare_cpu_engine(model: str, sizes: list[tuple[int, int]], threads: int | None = None,
                       on_note: Callable[[str], None] | None = None) -> list[str]:
    """Export `model` for the CPU runtimes at each (height, width) and time them here, so that
    predictions of images of those sizes (or tiles of that size) start without torch; returns,
    per size, the engine `auto` chose."""
    if not sizes:
        raise InputError("needs at least one size HxW", param="sizes")
    predictor = Predictor(resolve_model(model), "cpu", "auto", tile=max(max(s) for s in sizes), engine="auto",
                          on_note=on_note)
    engine = predictor.engine
    if not isinstance(engine, ExportedEngine):
        raise InputError("needs OpenVINO or ONNX Runtime and onnxscript installed (pip install openvino "
                         "onnxruntime onnxscript)", param="engine")
    engine.export_after = 0.0
    chosen = []
    for h, w in sizes:
        if h < 16 or w < 16:
            raise InputError(f"sizes must be at least 16x16, got {h}x{w}", param="sizes")
        predictor.scores(np.zeros((predictor.checkpoint.in_channels, h, w), np.float32))
        runtime = engine.chosen.get(engine.padded((h, w)), "torch")
        chosen.append(f"{h}x{w}: {runtime}")
    return chosen


def keep_card(predictor: Predictor) -> None:
    """The model's card in the cache, so that a later run whose exports are cached starts without
    torch (`bigseg.exported`)."""
    ckpt = predictor.checkpoint
    if not ckpt.file:
        return
    digest = ckpt.file_sha256 or sha256(Path(ckpt.file))
    norm = ckpt.normalization
    write_card(ModelCard(ckpt.arch, ckpt.config, list(ckpt.classes), [list(c) for c in ckpt.palette],
                         Normalisation(list(norm.mean), list(norm.std)), ckpt.in_channels,
                         getattr(predictor.model, "output_multiple", 1), getattr(predictor.model, "context_margin", None),
                         predictor.weights_digest, ckpt.input), digest)
    record_default_threads(torch.get_num_threads())


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


def predict_in_subtiles(predictor: Predictor, one: np.ndarray) -> np.ndarray:
    """Predict one (1, bands, h, w) tile that does not fit through a grid of half-size tiles."""
    _, _, h, w = one.shape
    side = max(h, w) // 2
    if side < 32:
        raise InputError("out of memory even for 32-pixel tiles; use the CPU or a smaller model")
    overlap = default_overlap(getattr(predictor.model, "context_margin", None), side)
    predictor.note(f"out of memory with one {max(h, w)}-pixel tile: predicting it in {side}-pixel sub-tiles "
                   f"(overlap {overlap})")
    out = np.zeros((1, predictor.num_classes, h, w), np.float32)
    valid = np.ones((h, w), bool)
    read = lambda win: (one[0][(slice(None), *win.slices)], valid[win.slices])
    predict = lambda x: predictor.predict(x).cpu().numpy()
    pipeline = Pipeline(predict, predictor.num_classes, predictor.fill, 1, NUMPY)
    for window, block, _ in stream_tiles(TileGrid(w, h, side, overlap), read, pipeline):
        if block is not None:
            out[(0, slice(None), *window.slices)] = block
    return out


def multi_scale_probabilities(model: Callable, x: torch.Tensor, scales: tuple[float, ...], flip: bool) -> torch.Tensor:
    """The mean softmax over scaled (and mirrored) copies of normalised `x`, each brought back to
    x's size (DeepLab / RefineNet test-time averaging)."""
    h, w = x.shape[-2:]
    total = None
    for s in scales:
        xs = x if s == 1 else F.interpolate(x, (max(1, round(h * s)), max(1, round(w * s))),
                                            mode="bilinear", align_corners=False)
        for mirrored in ((False, True) if flip else (False,)):
            y = model(xs.flip(-1) if mirrored else xs).float()
            y = y.flip(-1) if mirrored else y
            if s != 1:
                y = F.interpolate(y, (h, w), mode="bilinear", align_corners=False)
            p = y.softmax(1)
            total = p if total is None else total + p
    return total / (len(scales) * (2 if flip else 1))


def _out_of_memory(e: BaseException) -> bool:
    text = str(e).lower()
    return isinstance(e, torch.OutOfMemoryError) or any(
        m in text for m in ("can't allocate memory", "out of memory", "failed to allocate memory", "bad allocation"))
