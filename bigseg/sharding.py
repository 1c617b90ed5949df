"""`predict` across processes and machines under torchrun (PyTorch's own launcher and rendezvous).

Work is split deterministically by rank:
- with at least as many inputs as processes, whole files go round-robin (sorted order);
- otherwise every raster is cut into `world` parts, bands of whole tile rows: part p holds the
  output rows [lo, hi) between two tile-row starts, predicts every tile that reaches into them
  (tiles at a boundary run in both neighbouring parts) and writes them to its own hidden file
  `.NAME.part-PPP-of-NNN.tif`, committed atomically and tagged with the job's fingerprint. Rank 0
  then streams the parts, in blocks of rows, into the final output (COG, probabilities and overlay
  included). The stitcher adds tile contributions in the same order as a single process, so the
  result is the same bit for bit.

A rank that dies leaves its part unfinished (torchrun stops the others); running the same command
again keeps every finished part whose fingerprint matches and redoes only the missing ones.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Callable

import numpy as np

from bigseg import journal
from bigseg.errors import BigsegError
from bigseg.io.gdal import gdal_env
from bigseg.io.readers import open_raster
from bigseg.io.writers import GeoTiffWriter, OverlayWriter
from bigseg.inference import PREFETCH_BATCHES
from bigseg.tiling import Window

ROWS_PER_COPY = 512


@dataclass(frozen=True)
class Rank:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def active(self) -> bool:
        return self.world > 1


def rank_from_env() -> Rank:
    return Rank(int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1")),
                int(os.environ.get("LOCAL_RANK", "0")))


def init(rank: Rank) -> None:
    """Join torchrun's group (gloo: only barriers and small objects travel); long timeout, since
    ranks wait for the slowest part."""
    import torch.distributed as dist

    if rank.active and not dist.is_initialized():
        dist.init_process_group("gloo", timeout=timedelta(hours=72))


def shutdown(rank: Rank) -> None:
    """Leave the group cleanly (gloo aborts the process at exit otherwise)."""
    import torch.distributed as dist

    if rank.active and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def barrier(rank: Rank) -> None:
    import torch.distributed as dist

    if rank.active:
        dist.barrier()


def gather(rank: Rank, value):
    """Every rank's `value`, on every rank (a list in rank order)."""
    import torch.distributed as dist

    if not rank.active:
        return [value]
    out = [None] * rank.world
    dist.all_gather_object(out, value)
    return out


def part_rows(row_starts: list[int], height: int, parts: int) -> list[tuple[int, int]]:
    """Output rows of each part: cuts at tile-row starts, tile rows spread evenly."""
    n = len(row_starts)
    parts = max(1, min(parts, n))
    cuts = [0] + [row_starts[round(p * n / parts)] for p in range(1, parts)] + [height]
    return [(cuts[p], cuts[p + 1]) for p in range(parts)]


def part_path(dst: Path, part: int, parts: int, tag: str = "") -> Path:
    stem = dst.stem if not tag else f"{dst.stem}.{tag}"
    return dst.with_name(f".{stem}.part-{part:03d}-of-{parts:03d}.tif")


class _Shifted:
    """A part's writer seen in full-image coordinates."""

    def __init__(self, sink: GeoTiffWriter, top: int):
        self.sink, self.top = sink, top

    def write(self, window: Window, data: np.ndarray, valid: np.ndarray | None = None) -> None:
        self.sink.write(Window(window.col_off, window.row_off - self.top, window.width, window.height), data, valid)


def _open_part(path: Path):
    """Parts carry no georeference (the final output does): open without GDAL's warning."""
    import warnings

    import rasterio
    from rasterio.errors import NotGeoreferencedWarning

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NotGeoreferencedWarning)
        return rasterio.open(path)


def _part_done(path: Path, fp: str) -> bool:
    if not path.is_file():
        return False
    try:
        with _open_part(path) as ds:
            return ds.tags().get("bigseg_fingerprint") == fp
    except Exception:
        return False


def predict_part(segmenter, src: Path, dst: Path, read, write, part: int, parts: int) -> bool:
    """Write part `part` of `parts` of `src`'s outputs; False when a finished one was kept."""
    ckpt = segmenter.checkpoint
    with gdal_env(segmenter.io_threads), open_raster(src, ckpt.in_channels, read.bands, read.value_range, read.engine) as reader:
        fp = journal.fingerprint(src, segmenter.settings(read, write, dst) | {"parts": parts})
        grid = segmenter.grid(reader.width, reader.height)
        lo, hi = part_rows(grid.row_starts, reader.height, parts)[part]
        paths = {"mask": part_path(dst, part, parts)}
        if write.probs:
            paths["probs"] = part_path(dst, part, parts, "probs")
        if all(_part_done(p, fp) for p in paths.values()):
            return False
        sinks = {"mask": GeoTiffWriter(paths["mask"], reader.width, hi - lo, 1, None, tags={"bigseg_fingerprint": fp})}
        if write.probs:
            sinks["probs"] = GeoTiffWriter(paths["probs"], reader.width, hi - lo, ckpt.num_classes, None,
                                           tags={"bigseg_fingerprint": fp}, mask=True)
        shifted = {k: _Shifted(v, lo) for k, v in sinks.items()}
        try:
            for window, result, valid in segmenter.stream(grid, reader.read, segmenter.to_host(write), done_rows=lo,
                                                          stop_rows=hi, with_valid=True, prefetch=PREFETCH_BATCHES):
                if window.row_end <= lo or window.row_off >= hi:
                    continue
                segmenter._write_block(reader, shifted, window, result, valid)
            for sink in sinks.values():  # committed (renamed) only when complete
                sink.commit()
        except BaseException:
            for sink in sinks.values():
                sink.abort()
            raise
    return True


def assemble(segmenter, src: Path, dst: Path, read, write, parts: int) -> list[Path]:
    """Rank 0: stream the parts into the final outputs, then remove the parts."""
    from rasterio.windows import Window as RWindow

    ckpt = segmenter.checkpoint
    with gdal_env(segmenter.io_threads), open_raster(src, ckpt.in_channels, read.bands, read.value_range, read.engine) as reader:
        grid = segmenter.grid(reader.width, reader.height)
        spans = part_rows(grid.row_starts, reader.height, parts)
        sinks = segmenter._open_sinks(reader, dst, write)
        try:
            for p, (lo, hi) in enumerate(spans):
                with _open_part(part_path(dst, p, parts)) as mask, \
                        (_open_part(part_path(dst, p, parts, "probs")) if write.probs else _Null()) as probs:
                    for top in range(0, hi - lo, ROWS_PER_COPY):
                        h = min(ROWS_PER_COPY, hi - lo - top)
                        window = Window(0, lo + top, reader.width, h)
                        labels = mask.read(1, window=RWindow(0, top, reader.width, h))
                        sinks["mask"].write(window, labels)
                        if write.probs:
                            valid = probs.read_masks(1, window=RWindow(0, top, reader.width, h)) > 0
                            sinks["probs"].write(window, probs.read(window=RWindow(0, top, reader.width, h)), valid)
                        if write.overlay:
                            overlay: OverlayWriter = sinks["overlay"]
                            rows = {int(r): reader.read(Window(0, int(r), reader.width, 1))[0][:, 0]
                                    for r in overlay.rows_in(window)}
                            overlay.write(window, labels, rows)
            written = [sink.commit() for sink in sinks.values()]
        except BaseException:
            for sink in sinks.values():
                sink.abort()
            raise
    for p in range(len(spans)):
        for tag in ("", "probs"):
            part_path(dst, p, parts, tag).unlink(missing_ok=True)
    return written


class _Null:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def run_distributed(segmenter, jobs: list, rank: Rank, read, write, overwrite: bool,
                    on_event: Callable[[str, object], None]) -> tuple[list, list, list]:
    """This rank's share of `jobs`: returns (done, skipped, failed) as `run_predict` records them."""
    from bigseg.inference import PredictResult
    from bigseg.jobs import Failure

    done, skipped, failed = [], [], []
    if len(jobs) >= rank.world:
        for job in jobs[rank.rank::rank.world]:
            if job.output.exists() and not overwrite:
                skipped.append(job)
                on_event("skip", job)
                continue
            job.output.parent.mkdir(parents=True, exist_ok=True)
            on_event("start", job)
            try:
                result = segmenter.predict_file(job.input, job.output, read, write,
                                                on_tile=lambda d, t: on_event("tile", (d, t)))
            except BigsegError as e:
                failed.append(Failure(str(job.input), str(e)))
                on_event("fail", failed[-1])
                continue
            done.append(result)
            on_event("done", result)
        return done, skipped, failed
    for job in jobs:
        if job.output.exists() and not overwrite:
            if rank.rank == 0:
                skipped.append(job)
                on_event("skip", job)
            continue
        job.output.parent.mkdir(parents=True, exist_ok=True)
        error = None
        if job.output.suffix.lower() == ".png":   # small image formats: one rank does the whole file
            if rank.rank == 0:
                try:
                    done.append(segmenter.predict_file(job.input, job.output, read, write))
                    on_event("done", done[-1])
                except BigsegError as e:
                    error = str(e)
            errors = gather(rank, error)
        else:
            import time
            start = time.perf_counter()
            try:
                predict_part(segmenter, job.input, job.output, read, write, rank.rank, rank.world)
            except BigsegError as e:
                error = str(e)
            errors = gather(rank, error)   # also the barrier: every part is finished
            if rank.rank == 0 and not any(errors):
                try:
                    written = assemble(segmenter, job.input, job.output, read, write, rank.world)
                    with gdal_env(), open_raster(job.input, segmenter.checkpoint.in_channels, read.bands,
                                                 read.value_range, read.engine) as reader:
                        size = (reader.width, reader.height)
                    grid = segmenter.grid(*size)
                    done.append(PredictResult(job.input, written[0], *size, len(grid), time.perf_counter() - start,
                                              written[1:], [f"{rank.world} parts"]))
                    on_event("done", done[-1])
                except BigsegError as e:
                    error = str(e)
            barrier(rank)
        first = next((e for e in errors if e), None) or error
        if first and rank.rank == 0:
            failed.append(Failure(str(job.input), first))
            on_event("fail", failed[-1])
    return done, skipped, failed


def device_for_rank(device: str, rank: Rank) -> str:
    """Under torchrun, `auto`/`cuda` mean this process's GPU, cuda:LOCAL_RANK (when there are GPUs)."""
    import torch

    if rank.active and device in ("auto", "cuda") and torch.cuda.is_available():
        return f"cuda:{rank.local_rank % torch.cuda.device_count()}"
    return device


__all__ = ["Rank", "assemble", "device_for_rank", "part_rows", "predict_part", "rank_from_env", "run_distributed"]
