"""One file job: reader -> tiles through the predictor -> OutputSet, journaled so that a killed
job resumes where it stopped (`bigseg.run.journal`) with an identical result."""
from __future__ import annotations

import contextlib
import os
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

import numpy as np

from bigseg.vector.areas import AreaStats
from bigseg.errors import Interrupted, OutputError
from bigseg.tiling.geometry import Window
from bigseg.io.gdal import gdal_env
from bigseg.io.outputs import OutputSet, WriteOptions, writes_png
from bigseg.io.readers import IMAGE_SUFFIXES, Reader, ReadOptions, beyond_opencv
from bigseg.io.remote import is_remote
from bigseg.infer.predictor import Predictor
from bigseg.run import journal, regrid
from bigseg.run.inputs import open_for_model
from bigseg.runtime import check_stop, stop_handled
from bigseg.tiling.stitch import PREFETCH_BATCHES

JOURNAL_SECONDS = 5.0  # how often a journaled output is synced (resume granularity vs. a close/reopen)


@dataclass(frozen=True)
class JobOptions:
    """How files are read and written, beside the model: read and write options, how often the
    journal is advanced, and GDAL's decode/compress threads (None: 1 on the CPU, up to 8 with a
    GPU, which the host must keep up with)."""

    read: ReadOptions = ReadOptions()
    write: WriteOptions = WriteOptions()
    journal_seconds: float = JOURNAL_SECONDS
    io_threads: int | None = None

    def threads_for(self, on_gpu: bool) -> int:
        """GDAL's threads: several where the reader must keep a GPU fed, else one."""
        if self.io_threads is not None:
            return self.io_threads
        return min(8, os.cpu_count() or 1) if on_gpu else 1


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
    areas: AreaStats | None = None  # per-class pixels and areas (with WriteOptions.areas)

    @property
    def megapixels(self) -> float:
        return self.width * self.height / 1e6


def fingerprint(predictor: Predictor, reader: Reader, dst: Path, options: JobOptions, **extra: Any) -> str:
    """The resume fingerprint: the input's identity and everything that shapes `dst`'s content."""
    return journal.fingerprint(reader.path, {**predictor.fingerprint(), "read": vars(options.read),
                                             "write": options.write.shaping(), "output": dst.name, **extra},
                               reader.identity())


def predict_file(predictor: Predictor, src: Path, dst: Path, options: JobOptions = JobOptions(),
                 on_event: Callable[[str, Any], None] | None = None) -> PredictResult:
    """Segment one file into `dst`; extra outputs go beside it. `on_event` hears "tile" with
    (done, total) after every tile and "note" with a message when something is decided (e.g.
    resuming an interrupted run).

    GeoTIFF outputs are journaled: every `journal_seconds` the partial outputs are closed and the
    number of final rows recorded, so a killed or interrupted job resumes from there when run
    again with the same input and settings, with an identical result. Without a journaled row (or
    for PNG outputs) nothing is left on failure."""
    start = time.perf_counter()
    say = on_event or (lambda kind, payload: None)
    dst.parent.mkdir(parents=True, exist_ok=True)  # as the CLI and `predict()` do
    if _regrids(predictor, src, dst, options):
        return _predict_regridded(predictor, src, dst, options, say)
    if predictor.on_gpu:
        import torch

        torch.cuda.reset_peak_memory_stats(predictor.device)
    card = predictor.card
    with _environment(src, dst, options, predictor.on_gpu), open_for_model(src, card, options.read) as reader:
        fp = fingerprint(predictor, reader, dst, options)
        resumable = not writes_png(reader.kind, dst)
        rows_done, notes = _resume_point(dst, fp, reader.height, resumable)
        outputs, rows_done = _open_outputs(dst, reader, predictor, options.write, rows_done, notes)
        for n in notes:
            say("note", f"{src.name}: {n}")
        grid = predictor.grid(reader.width, reader.height)
        seams = {} if options.write.seams else None
        advance = journal.Advance(dst, fp, reader.height, options.journal_seconds if resumable else None, rows_done)
        try:
            with outputs:
                if rows_done:
                    outputs.keep_partial = True
                    journal.write_journal(dst, fp, rows_done, reader.height)
                    outputs.replay(rows_done, lambda window: reader.read(window)[0])
                _run_tiles(predictor, reader, outputs, grid, rows_done, seams, lambda d, t: say("tile", (d, t)),
                           advance)
                _finish_seams(outputs, seams, rows_done)
        except KeyboardInterrupt:
            stop_handled()
            kept = (f"{advance.rows} of {reader.height} rows of {dst.name} kept; run the same command to resume"
                    if advance.rows else f"nothing of {dst.name} was kept (no block row was finished)")
            raise Interrupted(f"interrupted: {kept}") from None
        journal.remove_journal(dst)
    gpu_peak = _gpu_peak_mib(predictor.device) if predictor.on_gpu else None
    areas = outputs.outputs.get("areas")
    return PredictResult(src, outputs.written[0], reader.width, reader.height, len(grid), time.perf_counter() - start,
                         outputs.written[1:], notes + reader.notes + predictor.take_notes(), seams, gpu_peak,
                         None if areas is None else areas.stats)


def _regrids(predictor: Predictor, src: Path, dst: Path, options: JobOptions) -> bool:
    """Whether the job reads its input at another pixel size and writes back on the input's grid."""
    read, card = options.read, predictor.card
    if read.output_grid != "input" or read.resolution == "native" or (
            read.resolution == "model" and not card.input.get("pixel_size")):
        return False
    with _environment(src, dst, options, predictor.on_gpu), open_for_model(src, card, read) as reader:
        return reader.resampled is not None


def _predict_regridded(predictor: Predictor, src: Path, dst: Path, options: JobOptions,
                       say: Callable[[str, Any], None]) -> PredictResult:
    """The prediction on the model's grid (a hidden journaled job), then its outputs on the input's."""
    start = time.perf_counter()
    inner = replace(options, read=replace(options.read, output_grid="model"),
                    write=WriteOptions(probs=options.write.probs, seams=options.write.seams))
    model_grid = predict_file(predictor, src, regrid.model_grid_path(dst), inner, say)
    with _environment(src, dst, options, predictor.on_gpu):
        outputs, width, height = regrid.onto_input_grid(predictor, src, dst, options.read, options.write)
    areas = outputs.outputs.get("areas")
    return PredictResult(src, outputs.written[0], width, height, model_grid.tiles, time.perf_counter() - start,
                         outputs.written[1:], model_grid.notes, model_grid.seams, model_grid.gpu_peak_mib,
                         None if areas is None else areas.stats)


def _environment(src: Path, dst: Path, options: JobOptions, on_gpu: bool):
    """GDAL's settings for the job (`bigseg.io.gdal`); none for a photograph OpenCV reads and writes,
    which then never loads GDAL (a quicker start for small images)."""
    if is_remote(src):
        return gdal_env(options.threads_for(on_gpu), remote=True)
    photo = src.suffix.lower() in IMAGE_SUFFIXES and dst.suffix.lower() == ".png" and options.read.engine in (
        "auto", "opencv") and not beyond_opencv(src)
    return contextlib.nullcontext() if photo else gdal_env(options.threads_for(on_gpu))


def _finish_seams(outputs: OutputSet, seams: dict | None, rows_done: int) -> None:
    """The seam report's rate, also as a tag of the mask."""
    if seams is None:
        return
    seams["rate"] = round(seams["disagreed"] / max(seams["compared"], 1), 6)
    if rows_done:
        seams["note"] = f"rows {rows_done} and below only (resumed run)"
    outputs.tag(seam_disagreement=str(seams["rate"]))


def _resume_point(dst: Path, fp: str, height: int, resumable: bool) -> tuple[int, list[str]]:
    """Rows an interrupted run of this very job left on disk (0: start afresh), and what to say."""
    previous = journal.read_journal(dst) if resumable else None
    if previous is None:
        return 0, []
    journal.remove_journal(dst)
    if previous["fingerprint"] == fp and 0 < previous["rows_done"] <= height:
        return previous["rows_done"], [f"resuming the interrupted run at row {previous['rows_done']} of {height}"]
    return 0, ["the input or settings changed since the interrupted run: starting over"]


def _open_outputs(dst: Path, reader: Reader, predictor: Predictor, write: WriteOptions, rows_done: int,
                  notes: list[str]) -> tuple[OutputSet, int]:
    """The job's OutputSet, continuing the partial files from `rows_done` when they are usable."""
    card = predictor.card

    def create(rows: int) -> OutputSet:
        return OutputSet.create(dst, reader.kind, reader.width, reader.height, reader.georef, card.classes,
                                card.palette, write, resume_rows=rows)
    try:
        return create(rows_done), rows_done
    except OutputError as e:
        if not rows_done:
            raise
        notes[-1] = f"the interrupted run's partial output is unusable ({e}): starting over"
        journal.remove_journal(dst)
        return create(0), 0


def _run_tiles(predictor: Predictor, reader: Reader, outputs: OutputSet, grid, rows_done: int,
               seams: dict | None, on_tile: Callable[[int, int], None] | None, advance: journal.Advance) -> None:
    """Stream every tile below `rows_done` into `outputs`, advancing the journal as block rows land."""
    done = [0]

    def tile_done(window: Window) -> None:
        done[0] += 1
        if on_tile is not None:
            on_tile(done[0], len(grid))

    def read(window: Window) -> tuple[np.ndarray, np.ndarray] | None:
        if reader.empty(window):  # e.g. absent blocks of a sparse GeoTIFF: not even read
            return None
        data, valid = reader.read(window)
        outputs.add_image(window, data)
        return data, valid

    if on_tile is not None:
        on_tile(0, len(grid))
    finish = predictor.labels_and_probabilities(outputs.probabilities)

    def journal_rows() -> None:
        if advance.due(outputs.rows_on_disk):
            outputs.sync()
            advance.to(outputs.rows_on_disk)
            outputs.keep_partial = True

    write_tiles(predictor.stream(grid, read, finish, PREFETCH_BATCHES, rows=(rows_done, grid.height),
                                 on_tile=tile_done, seams=seams), outputs, journal_rows)


def write_tiles(stream, outputs: OutputSet, after_tile: Callable[[], None] | None = None) -> None:
    """Write what `Predictor.stream` yields into `outputs` (nodata for an empty tile), checking for
    a stop between tiles; `after_tile` runs after each one is written."""
    for window, copy, valid in stream:
        check_stop()
        if copy is None:
            outputs.write_nodata(window)
        else:
            arrays = copy.numpy()
            outputs.write(window, arrays["labels"], arrays.get("probs"), valid)
        if after_tile is not None:
            after_tile()


def _gpu_peak_mib(device: str) -> float:
    """The process's peak GPU memory as nvidia-smi would show it on a GPU of its own: what is used
    now (CUDA context and libraries included) plus how far torch's reserved memory peaked above now."""
    import torch

    free, total = torch.cuda.mem_get_info(device)
    now = torch.cuda.memory_reserved(device)
    return (total - free - now + torch.cuda.max_memory_reserved(device)) / 2 ** 20
