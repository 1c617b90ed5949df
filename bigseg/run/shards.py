"""One raster across the processes of a torchrun job: parts and their assembly.

With fewer inputs than processes, every raster is cut into `world` parts, bands of whole tile
rows: part p holds the output rows [top, bottom) between two tile-row starts, predicts every tile
that reaches into them (tiles at a boundary run in both neighbouring parts) and writes them to
hidden part files (`OutputSet.part`), committed atomically and tagged with the job's fingerprint.
Rank 0 then streams the parts, in blocks of rows, into the final outputs (COG, probabilities and
overlay included). The stitcher adds tile contributions in the same order as a single process,
so the result is the same bit for bit.

A rank that dies leaves its part unfinished (torchrun stops the others); running the same command
again keeps every finished part whose fingerprint matches and redoes only the missing ones.
"""
from __future__ import annotations

import time
import warnings
from pathlib import Path

from bigseg import distributed
from bigseg.distributed import Rank
from bigseg.errors import BigsegError
from bigseg.tiling.geometry import Window
from bigseg.io.gdal import gdal_env
from bigseg.io.outputs import OutputSet, part_path
from bigseg.io.remote import is_remote
from bigseg.run.discover import Job
from bigseg.run.file_job import (
    JobOptions,
    PredictResult,
    fingerprint,
    predict_file,
    write_tiles,
)
from bigseg.run.inputs import open_for_model
from bigseg.infer.predictor import Predictor
from bigseg.tiling.stitch import PREFETCH_BATCHES


ROWS_PER_COPY = 512


def part_rows(row_starts: list[int], height: int, parts: int) -> list[tuple[int, int]]:
    """Output rows of each part: cuts at tile-row starts, tile rows spread evenly."""
    n = len(row_starts)
    parts = max(1, min(parts, n))
    cuts = [0] + [row_starts[round(p * n / parts)] for p in range(1, parts)] + [height]
    return [(cuts[p], cuts[p + 1]) for p in range(parts)]


def _open_part(path: Path):
    """Parts carry no georeference (the final output does): open without GDAL's warning."""
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
    except Exception:  # an unreadable part is redone
        return False


def predict_part(predictor: Predictor, src: Path, dst: Path, options: JobOptions, part: int, parts: int) -> bool:
    """Write part `part` of `parts` of `src`'s outputs; False when a finished one was kept."""
    ckpt = predictor.card
    probs = options.write.probs
    with gdal_env(options.threads_for(predictor.on_gpu), remote=is_remote(src)), open_for_model(src, ckpt, options.read) as reader:
        fp = fingerprint(predictor, reader, dst, options, parts=parts)
        grid = predictor.grid(reader.width, reader.height)
        rows = part_rows(grid.row_starts, reader.height, parts)[part]
        paths = [part_path(dst, part, parts)] + ([part_path(dst, part, parts, "probs")] if probs else [])
        if all(_part_done(p, fp) for p in paths):
            return False
        finish = predictor.labels_and_probabilities(probs)
        with OutputSet.part(dst, part, parts, reader.width, rows, ckpt.num_classes, probs, fp) as outputs:
            read = lambda window: None if reader.empty(window) else reader.read(window)
            write_tiles(predictor.stream(grid, read, finish, PREFETCH_BATCHES, rows=rows), outputs)
    return True


def assemble(predictor: Predictor, src: Path, dst: Path, options: JobOptions, parts: int) -> tuple[OutputSet, int]:
    """Rank 0: stream the parts into the final outputs (and the files made from the mask's rows:
    polygons, areas), then remove the parts. Returns the committed outputs and the number of tiles."""
    from rasterio.windows import Window as RWindow

    ckpt = predictor.card
    with gdal_env(options.threads_for(predictor.on_gpu), remote=is_remote(src)), open_for_model(src, ckpt, options.read) as reader:
        grid = predictor.grid(reader.width, reader.height)
        spans = part_rows(grid.row_starts, reader.height, parts)
        outputs = OutputSet.create(dst, reader.kind, reader.width, reader.height, reader.georef, ckpt.classes,
                                   ckpt.palette, options.write)
        with outputs:
            for p, (top, bottom) in enumerate(spans):
                mask = _open_part(part_path(dst, p, parts))
                probs = _open_part(part_path(dst, p, parts, "probs")) if options.write.probs else None
                try:
                    for row in range(0, bottom - top, ROWS_PER_COPY):
                        h = min(ROWS_PER_COPY, bottom - top - row)
                        window, rw = Window(0, top + row, reader.width, h), RWindow(0, row, reader.width, h)
                        for r in outputs.image_rows(window):
                            line = Window(0, r, reader.width, 1)
                            outputs.add_image(line, reader.read(line)[0])
                        outputs.write(window, mask.read(1, window=rw),
                                      None if probs is None else probs.read(window=rw),
                                      None if probs is None else probs.read_masks(1, window=rw) > 0)
                finally:
                    mask.close()
                    if probs is not None:
                        probs.close()
    for p in range(len(spans)):
        for tag in ("", "probs"):
            part_path(dst, p, parts, tag).unlink(missing_ok=True)
    return outputs, len(grid)


def predict_split(predictor: Predictor, job: Job, rank: Rank, options: JobOptions) -> PredictResult | None:
    """This rank's part of `job` (PNG-like outputs: rank 0 does the whole file); rank 0 assembles
    and returns the result. Every rank raises when any part failed."""
    start = time.perf_counter()
    result, error = None, None
    if job.output.suffix.lower() == ".png":  # small image formats: one rank does the whole file
        if rank.main:
            try:
                result = predict_file(predictor, job.input, job.output, options)
            except BigsegError as e:
                error = str(e)
        errors = distributed.gather(rank, error)
    else:
        try:
            predict_part(predictor, job.input, job.output, options, rank.rank, rank.world)
        except BigsegError as e:
            error = str(e)
        errors = distributed.gather(rank, error)  # also the barrier: every part is finished
        if rank.main and not any(errors):
            try:
                outputs, tiles = assemble(predictor, job.input, job.output, options, rank.world)
                written, areas = outputs.written, outputs.outputs.get("areas")
                result = PredictResult(job.input, written[0], *_size(written[0]), tiles, time.perf_counter() - start,
                                       written[1:], [f"{rank.world} parts"],
                                       areas=None if areas is None else areas.stats)
            except BigsegError as e:
                error = str(e)
        distributed.barrier(rank)
    first = next((e for e in errors if e), None) or error
    if first:
        raise BigsegError(first)  # a part's own message, whichever rank failed
    return result


def _size(path: Path) -> tuple[int, int]:
    with _open_part(path) as ds:
        return ds.width, ds.height
