"""The predictor: a checkpoint on a device, turned into a batched `predict(tiles)` callable and run
over rasters of any size by the streaming tiling engine, writing masks as rows finish."""
from __future__ import annotations

import hashlib
import os
import time
from contextlib import ExitStack, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from bigseg import journal
from bigseg.checkpoint import Checkpoint
from bigseg.crf import CRFParams, dense_crf
from bigseg.device import HostCopy, TorchArrays, labels_of, resolve_device, resolve_precision
from bigseg.errors import InputError, OutputError
from bigseg.io.gdal import gdal_env
from bigseg.io.readers import Reader, open_raster
from bigseg.io.writers import NODATA, GeoTiffWriter, OverlayWriter, PngWriter
from bigseg.models.receptive import default_overlap
from bigseg.tiling import NUMPY, TileGrid, Window, stitcher_peak_pixels, stream_tiles

DEFAULT_TILE = 1024
DEFAULT_BATCH = 4


@dataclass(frozen=True)
class ReadOptions:
    bands: tuple[int, ...] | None = None
    value_range: tuple[float, float] | None = None
    engine: str = "auto"


@dataclass(frozen=True)
class WriteOptions:
    probs: bool = False
    overlay: bool = False
    cog: bool = False
    seams: bool = False  # report how often neighbouring tiles disagree in their overlaps


@dataclass
class PredictResult:
    input: Path
    output: Path
    width: int
    height: int
    tiles: int
    seconds: float
    extras: list[Path] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    seams: dict | None = None  # overlap pixels compared / disagreeing (with WriteOptions.seams)
    gpu_peak_mib: float | None = None  # peak GPU memory of this process during the file (on a GPU)

    @property
    def megapixels(self) -> float:
        return self.width * self.height / 1e6


class Segmenter:
    """A trained model ready to segment arrays or files. The CLI's `predict` and `eval` call this."""

    def __init__(self, checkpoint: Checkpoint, device: str = "auto", precision: str = "auto",
                 tile: int = DEFAULT_TILE, overlap: int | None = None, batch_size: int = DEFAULT_BATCH,
                 scales: tuple[float, ...] = (1.0,), flip: bool = False, crf: CRFParams | None = None,
                 compile: bool = False, journal_seconds: float = 5.0, io_threads: int | None = None):
        self.checkpoint = checkpoint
        self.crf = crf
        if not scales or any(not 0.1 <= s <= 4 for s in scales):
            raise InputError(f"--scales must be factors between 0.1 and 4, got {scales}")
        self.scales, self.flip = tuple(scales), flip
        self.device = resolve_device(device)
        self.dtype = resolve_precision(precision, self.device)
        if tile < 16:
            raise InputError(f"--tile must be at least 16 pixels, got {tile}")
        self.tile = tile
        if batch_size < 1:
            raise InputError(f"--batch-size must be at least 1, got {batch_size}")
        self.batch_size = batch_size
        # how often a journaled output is synced to disk (resume granularity vs. a close/reopen)
        self.checkpoint_seconds = journal_seconds
        # GDAL threads for decoding input blocks and compressing output blocks: on a GPU the host
        # must keep up with the model; on the CPU the model already uses every core
        if io_threads is None:
            io_threads = min(8, os.cpu_count() or 1) if self.device.type == "cuda" else 1
        if io_threads < 1:
            raise InputError(f"--io-threads must be at least 1, got {io_threads}")
        self.io_threads = io_threads
        self.model = checkpoint.build_model().to(self.device)
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True  # tiles share one shape: autotune once
            self.model = self.model.to(memory_format=torch.channels_last)
        if compile:
            self.model = torch.compile(self.model, dynamic=False)
        # scores are blended where they are computed; on a GPU the next batch is queued before
        # the previous one's results are written (see `bigseg.tiling.stream_tiles`)
        self.arrays = TorchArrays(self.device)
        self.lookahead = 1 if self.device.type == "cuda" else 0
        self.notes: list[str] = []  # things said once per run (e.g. out-of-memory back-off)
        margin = getattr(self.model, "context_margin", None)
        if overlap is not None:
            self.overlap, self.overlap_from = overlap, "--overlap"
        elif margin is None:
            self.overlap = default_overlap(None, tile)
            self.overlap_from = "tile/4: the model sees the whole tile (global pooling or unbounded context)"
        else:
            self.overlap = default_overlap(margin, tile)
            self.overlap_from = f"from the model's context margin {margin} px (4 x margin, at most tile/2)"
        if not 0 <= self.overlap < tile:
            raise InputError(f"--overlap must be in [0, tile), got {self.overlap} for tile {tile}")
        norm = checkpoint.normalization
        self._mean = torch.tensor(norm.mean, dtype=torch.float32, device=self.device).view(1, -1, 1, 1)
        self._std = torch.tensor(norm.std, dtype=torch.float32, device=self.device).view(1, -1, 1, 1)
        self.fill = np.asarray(norm.mean, np.float32).reshape(-1, 1, 1)

    @property
    def num_classes(self) -> int:
        return self.checkpoint.num_classes

    @property
    def averages_probabilities(self) -> bool:
        """Several scales, flips or a CRF: tiles give probabilities instead of logits."""
        return self.scales != (1.0,) or self.flip or self.crf is not None

    def tile_scores(self, batch: np.ndarray) -> torch.Tensor:
        """The engine's `predict(batch)`: (n, bands, h, w) image values in 0..255 -> (n, classes, h, w)
        float32 logits on the device, or probabilities with several scales, flips or a CRF
        (`averages_probabilities`). Returns without waiting for the device.

        Out-of-memory back-off: a batch that does not fit is split in halves (and later batches
        stay at the size that fit), down to one tile; a single tile that does not fit is predicted
        in sub-tiles of half its side with the same overlap rules. Tiles are independent, so a
        halved batch gives the same result as that batch size from the start."""
        n = len(batch)
        step = min(n, self._fitting_batch or n)
        out, i = [], 0
        while i < n:
            chunk = batch[i:i + step]
            try:
                out.append(self._tile_scores(chunk))
                i += len(chunk)
            except (torch.OutOfMemoryError, RuntimeError) as e:
                if not _out_of_memory(e):
                    raise
                self._release_memory()
                if step > 1:
                    step //= 2
                    self._fitting_batch = step
                    self._note(f"out of memory with {2 * step} tiles per batch: continuing with {step}")
                else:
                    out.append(torch.from_numpy(self._subtiled(chunk)).to(self.device))
                    i += 1
        return out[0] if len(out) == 1 else torch.cat(out)

    _fitting_batch: int | None = None

    def _note(self, message: str) -> None:
        if message not in self.notes:
            self.notes.append(message)

    def _take_notes(self) -> list[str]:
        taken, self.notes = self.notes, []
        return taken

    def _release_memory(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def _subtiled(self, one: np.ndarray) -> np.ndarray:
        """Predict one (1, bands, h, w) tile that does not fit through a grid of half-size tiles."""
        _, _, h, w = one.shape
        side = max(h, w) // 2
        if side < 32:
            raise InputError("out of memory even for 32-pixel tiles; use --device cpu or a smaller model")
        overlap = default_overlap(getattr(self.model, "context_margin", None), side)
        self._note(f"out of memory with one {max(h, w)}-pixel tile: predicting it in {side}-pixel sub-tiles "
                   f"(overlap {overlap})")
        grid = TileGrid(w, h, side, overlap)
        out = np.zeros((1, self.num_classes, h, w), np.float32)
        valid = np.ones((h, w), bool)
        read = lambda win: (one[0][(slice(None), *win.slices)], valid[win.slices])  # noqa: E731
        predict = lambda x: self.tile_scores(x).cpu().numpy()  # noqa: E731
        for window, block in stream_tiles(grid, read, predict, self.num_classes, 1, self.fill, arrays=NUMPY):
            out[(0, slice(None), *window.slices)] = block
        return out

    def _tile_scores(self, batch: np.ndarray) -> torch.Tensor:
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
        x = (image - self._mean) / self._std
        if x.is_cuda:
            x = x.contiguous(memory_format=torch.channels_last)
        autocast = (torch.autocast(self.device.type, dtype=self.dtype)
                    if self.dtype is not torch.float32 else nullcontext())
        with torch.inference_mode(), autocast:
            if self.scales == (1.0,) and not self.flip:
                y = self.model(x).float()
                return y.softmax(1) if self.crf is not None else y
            h, w = x.shape[-2:]
            total = None
            for s in self.scales:
                xs = x if s == 1 else F.interpolate(x, (max(1, round(h * s)), max(1, round(w * s))),
                                                    mode="bilinear", align_corners=False)
                for mirrored in ((False, True) if self.flip else (False,)):
                    y = self.model(xs.flip(-1) if mirrored else xs).float()
                    y = y.flip(-1) if mirrored else y
                    if s != 1:
                        y = F.interpolate(y, (h, w), mode="bilinear", align_corners=False)
                    p = y.softmax(1)
                    total = p if total is None else total + p
            return total / (len(self.scales) * (2 if self.flip else 1))

    def grid(self, width: int, height: int) -> TileGrid:
        return TileGrid(width, height, self.tile, self.overlap)

    def stream(self, grid: TileGrid, read: Callable, finish: Callable | None = None, **options):
        """`bigseg.tiling.stream_tiles` with this model: scores blended on the device, `finish`
        applied to each finished (window, scores, valid) there, the next batch queued ahead on a GPU."""
        arrays, predict = self.arrays, self.tile_scores
        if not self.blends_on_device(grid):
            arrays = TorchArrays(torch.device("cpu"))
            predict = lambda batch: self.tile_scores(batch).cpu()  # noqa: E731
            self._note("the stitcher's overlap band would not fit in GPU memory: blending on the host")
        return stream_tiles(grid, read, predict, self.num_classes, self.batch_size, self.fill,
                            arrays=arrays, finish=finish, lookahead=self.lookahead, **options)

    def blends_on_device(self, grid: TileGrid) -> bool:
        """Blend on the model's device unless, on a GPU, the stitcher's largest held area would
        take more than half of the free memory (a very wide raster): then on the host."""
        if self.device.type != "cuda":
            return True
        need = stitcher_peak_pixels(grid) * (self.num_classes + 1) * 4
        return need < 0.5 * torch.cuda.mem_get_info(self.device)[0]

    def scores(self, image: np.ndarray, valid: np.ndarray | None = None) -> np.ndarray:
        """Tiled scores of an in-memory (bands, H, W) image, exactly as files are processed."""
        _, h, w = image.shape
        valid = np.ones((h, w), bool) if valid is None else valid
        out = np.zeros((self.num_classes, h, w), np.float32)
        read = lambda win: (image[(slice(None), *win.slices)].astype(np.float32), valid[win.slices])  # noqa: E731
        finish = lambda window, block: (window, HostCopy({"scores": block}))  # noqa: E731
        for window, copy in self.stream(self.grid(w, h), read, finish):
            out[(slice(None), *window.slices)] = copy.numpy()["scores"]
        return out

    def segment(self, image: np.ndarray, valid: np.ndarray | None = None) -> np.ndarray:
        """Class indices (H, W) uint8 of a (bands, H, W) image; invalid pixels get 255."""
        labels = self.scores(image, valid).argmax(0).astype(np.uint8)
        if valid is not None:
            labels[~valid] = NODATA
        return labels

    def predict_file(self, src: Path, dst: Path, read: ReadOptions = ReadOptions(),
                     write: WriteOptions = WriteOptions(),
                     on_tile: Callable[[int, int], None] | None = None) -> PredictResult:
        """Segment one file into `dst`; extra outputs go beside it. `on_tile(done, total)` reports
        progress after every tile.

        GeoTIFF outputs are journaled (`bigseg.journal`): every `checkpoint_seconds` the partial
        outputs are closed and the number of final rows recorded, so a killed or interrupted job
        resumes from there when run again with the same input and settings, with an identical
        result. Without a journaled row (or for PNG outputs) nothing is left on failure."""
        start = time.perf_counter()
        notes: list[str] = []
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        with gdal_env(self.io_threads), ExitStack() as stack, open_raster(src, self.checkpoint.in_channels, read.bands,
                                               read.value_range, read.engine) as reader:
            fp = journal.fingerprint(src, self.settings(read, write, dst))
            resumable = not (reader.kind == "image" and dst.suffix.lower() == ".png")
            rows_done = 0
            previous = journal.read_journal(dst) if resumable else None
            if previous is not None:
                if previous["fingerprint"] == fp and 0 < previous["rows_done"] <= reader.height:
                    rows_done = previous["rows_done"]
                    notes.append(f"resuming the interrupted run at row {rows_done} of {reader.height}")
                else:
                    notes.append("the input or settings changed since the interrupted run: starting over")
                journal.remove_journal(dst)
            try:
                sinks = self._open_sinks(reader, dst, write, resume_rows=rows_done)
            except OutputError as e:
                if not rows_done:
                    raise
                notes[-1] = f"the interrupted run's partial output is unusable ({e}): starting over"
                rows_done = 0
                sinks = self._open_sinks(reader, dst, write)
            journaled_sinks = [s for s in sinks.values() if isinstance(s, GeoTiffWriter)]
            state = {"journaled": 0}

            def cleanup() -> None:
                if any(getattr(s, "_done", False) for s in sinks.values()):
                    return
                for sink in sinks.values():
                    if state["journaled"] and hasattr(sink, "suspend"):
                        sink.suspend()   # keep the partial output: the journal points into it
                    else:
                        sink.abort()
                if not state["journaled"]:
                    journal.remove_journal(dst)

            stack.callback(cleanup)
            if rows_done:
                state["journaled"] = rows_done
                journal.write_journal(dst, fp, rows_done, reader.height)
                self._replay_overlay(reader, sinks, rows_done)
            grid = self.grid(reader.width, reader.height)
            done = [0]

            def tile_done(window: Window) -> None:
                done[0] += 1
                if on_tile is not None:
                    on_tile(done[0], len(grid))

            if on_tile is not None:
                on_tile(0, len(grid))
            last_sync = time.monotonic()
            seams = {} if write.seams else None
            for window, result, valid in self.stream(grid, reader.read, self.to_host(write), on_tile=tile_done,
                                                     done_rows=rows_done, seams=seams, with_valid=True,
                                                     prefetch=PREFETCH_BATCHES):
                if window.row_end <= rows_done:
                    continue  # already final on disk
                self._write_block(reader, sinks, window, result, valid)
                if not resumable or time.monotonic() - last_sync < self.checkpoint_seconds:
                    continue
                on_disk = min(s.rows_written for s in journaled_sinks)  # whole block rows, written once
                if on_disk > state["journaled"]:
                    for sink in journaled_sinks:
                        sink.sync()
                    journal.write_journal(dst, fp, on_disk, reader.height)
                    state["journaled"] = on_disk
                    last_sync = time.monotonic()
            if seams is not None:
                seams["rate"] = round(seams["disagreed"] / max(seams["compared"], 1), 6)
                if rows_done:
                    seams["note"] = f"rows {rows_done} and below only (resumed run)"
                if hasattr(sinks["mask"], "ds"):
                    sinks["mask"].ds.update_tags(seam_disagreement=str(seams["rate"]))
            written = []
            for sink in sinks.values():
                written.append(sink.commit())
                sink._done = True
            journal.remove_journal(dst)
        gpu_peak = _gpu_peak_mib(self.device) if self.device.type == "cuda" else None
        return PredictResult(src, written[0], reader.width, reader.height, len(grid),
                             time.perf_counter() - start, written[1:], notes + reader.notes + self._take_notes(),
                             seams, gpu_peak)

    def settings(self, read: ReadOptions, write: WriteOptions, dst: Path) -> dict:
        """Everything that shapes `dst`'s content, for the resume fingerprint."""
        return {"weights": self.weights_digest, "arch": self.checkpoint.arch, "config": self.checkpoint.config,
                "classes": self.checkpoint.classes, "tile": self.tile, "overlap": self.overlap,
                "scales": self.scales, "flip": self.flip, "crf": None if self.crf is None else vars(self.crf),
                "precision": str(self.dtype), "device": self.device.type, "read": vars(read),
                "write": vars(write), "output": dst.name}

    @property
    def weights_digest(self) -> str:
        if getattr(self, "_digest", None) is None:
            h = hashlib.sha256()
            for name, t in sorted(self.checkpoint.state_dict.items()):
                h.update(name.encode())
                h.update(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes()
                         if t.numel() else b"")
            self._digest = h.hexdigest()
        return self._digest

    def _replay_overlay(self, reader: Reader, sinks: dict, rows_done: int) -> None:
        """A resumed job rebuilds the overlay preview of the finished rows from the partial mask."""
        if "overlay" not in sinks:
            return
        overlay = sinks["overlay"]
        for top in range(0, rows_done, 512):
            window = Window(0, top, reader.width, min(512, rows_done - top))
            labels = sinks["mask"].read(window)[0]
            image_rows = {int(r): reader.read(Window(0, int(r), reader.width, 1))[0][:, 0]
                          for r in overlay.rows_in(window)}
            overlay.write(window, labels, image_rows)

    def _open_sinks(self, reader: Reader, dst: Path, write: WriteOptions, resume_rows: int = 0) -> dict:
        ckpt = self.checkpoint
        sinks: dict = {}
        try:
            if reader.kind == "image" and dst.suffix.lower() == ".png":
                sinks["mask"] = PngWriter(dst, reader.width, reader.height)
            else:
                sinks["mask"] = GeoTiffWriter(dst, reader.width, reader.height, 1, reader.georef,
                                              ckpt.palette, {"classes": ckpt.classes}, cog=write.cog,
                                              resume_rows=resume_rows)
            if write.probs:
                sinks["probs"] = GeoTiffWriter(sibling(dst, "probs", ".tif"), reader.width, reader.height,
                                               ckpt.num_classes, reader.georef,
                                               tags={"classes": ckpt.classes, "scale": "p = value / 255"},
                                               cog=write.cog, mask=True, resume_rows=resume_rows)
            if write.overlay:
                sinks["overlay"] = OverlayWriter(sibling(dst, "overlay", ".png"), reader.width,
                                                 reader.height, ckpt.palette)
        except BaseException:
            for sink in sinks.values():
                sink.abort()
            raise
        return sinks

    def to_host(self, write: WriteOptions) -> Callable:
        """The engine's `finish` for writing: on the device, a finished rectangle's scores become
        uint8 labels (and uint8 probabilities with `--probs`), whose copy to the host starts at
        once; the float scores never leave the device."""
        def finish(window: Window, block: torch.Tensor, valid: np.ndarray):
            out = {"labels": labels_of(block)}
            if write.probs:
                if self.averages_probabilities:
                    p = block / block.sum(0, keepdim=True).clamp_min(1e-12)
                else:
                    p = torch.softmax(block, 0)
                out["probs"] = torch.round(p * 255).to(torch.uint8)
            return window, HostCopy(out), valid
        return finish

    def _write_block(self, reader: Reader, sinks: dict, window: Window, result: HostCopy,
                     valid: np.ndarray | None = None) -> None:
        if valid is None:
            valid = reader.read_valid(window)
        arrays = result.numpy()
        labels = arrays["labels"]
        labels[~valid] = NODATA
        sinks["mask"].write(window, labels)
        if "probs" in sinks:
            probs = arrays["probs"]
            probs[:, ~valid] = 0
            sinks["probs"].write(window, probs, valid)
        if "overlay" in sinks:
            overlay = sinks["overlay"]
            image_rows = {int(r): reader.read(Window(window.col_off, int(r), window.width, 1))[0][:, 0]
                          for r in overlay.rows_in(window)}
            overlay.write(window, labels, image_rows)


def _gpu_peak_mib(device: torch.device) -> float:
    """The process's peak GPU memory as nvidia-smi would show it on a GPU of its own: what is used
    now (CUDA context and libraries included) plus how far torch's reserved memory peaked above now."""
    free, total = torch.cuda.mem_get_info(device)
    now = torch.cuda.memory_reserved(device)
    return (total - free - now + torch.cuda.max_memory_reserved(device)) / 2 ** 20


def _out_of_memory(e: BaseException) -> bool:
    return isinstance(e, torch.OutOfMemoryError) or "can't allocate memory" in str(e) \
        or "out of memory" in str(e).lower()


PREFETCH_BATCHES = 2  # batches read ahead in a background thread while the model runs


def sibling(path: Path, tag: str, suffix: str) -> Path:
    """`city.mask.tif` -> `city.probs.tif`; `out.tif` -> `out.probs.tif`."""
    stem = path.name[: -len(".mask" + path.suffix)] if path.name.endswith(".mask" + path.suffix) else path.stem
    return path.with_name(f"{stem}.{tag}{suffix}")
