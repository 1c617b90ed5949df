"""Batch predict: every input of a command line, in one job loop: skip finished outputs, continue
past bad files, report each in a summary. Under torchrun the jobs are shared between processes
(whole files round-robin, or each raster cut into parts, `bigseg.run.shards`)."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from bigseg import distributed
from bigseg.atomic import write_text
from bigseg.errors import describe_failure
from bigseg.infer.predictor import Predictor
from bigseg.run.discover import Failure, Job, prepare
from bigseg.run.file_job import JobOptions, PredictResult, predict_file
from bigseg.run.vectorize import VectorOptions, mask_areas, vector_paths, vectorize_file
from bigseg.run.shards import predict_split

Events = Callable[[str, object], None]


@dataclass
class Summary:
    done: list[PredictResult] = field(default_factory=list)
    skipped: list[Job] = field(default_factory=list)    # outputs already there
    failed: list[Failure] = field(default_factory=list)
    ignored: list[Failure] = field(default_factory=list)  # bigseg's own outputs among the inputs

    @property
    def ok(self) -> bool:
        return not self.failed

    def add(self, other: Summary) -> None:
        self.done += other.done
        self.skipped += other.skipped
        self.failed += other.failed
        self.ignored += other.ignored


def run_jobs(jobs: list[Job], work: Callable[[Job, Events], PredictResult | None], overwrite: bool,
             on_event: Events, speak: bool = True, finished: Callable[[Job], bool] = lambda job: job.output.exists()
             ) -> Summary:
    """The job loop: `work(job, on_event)` for every job not `finished` (or all with `overwrite`).
    Events (when `speak`): start(job), tile((done, total)), note(message), done(result), skip(job),
    fail(failure)."""
    summary = Summary()
    say = on_event if speak else (lambda kind, payload: None)
    for job in jobs:
        if finished(job) and not overwrite:
            if speak:
                summary.skipped.append(job)
            say("skip", job)
            continue
        job.output.parent.mkdir(parents=True, exist_ok=True)
        say("start", job)
        try:
            result = work(job, say)
        except Exception as e:  # whatever a file raises, it fails alone and the batch goes on
            failure = Failure(str(job.input), _message(job, e), getattr(e, "param", None), getattr(e, "reason", None))
            if speak:
                summary.failed.append(failure)
            say("fail", failure)
            continue
        if result is not None and speak:
            summary.done.append(result)
            say("done", result)
    return summary


def extra_paths(mask: Path, options: JobOptions) -> list[Path]:
    """The files `--vector` and `--areas` add beside a mask."""
    if options.vector is None and not options.areas:
        return []
    polygons, csv = vector_paths(mask, options.vector or VectorOptions())
    return ([polygons] if options.vector is not None else []) + ([csv] if options.areas else [])


def add_extras(result: PredictResult, options: JobOptions) -> PredictResult:
    """A finished mask's polygons and areas table (areas counted as it was written, or read back)."""
    if options.vector is None and not options.areas:
        return result
    polygons, csv = vector_paths(result.output, options.vector or VectorOptions())
    if options.areas:
        result.areas = result.areas or mask_areas(result.output)
        write_text(csv, result.areas.csv())
        result.extras.append(csv)
    if options.vector is not None:
        done = vectorize_file(result.output, polygons, options.vector)
        result.extras.append(done.output)
        result.notes += done.notes + [f"{done.polygons} polygons in {done.output.name} ({done.seconds:.1f} s)"]
    return result


def extras_of_mask(src: Path, mask: Path, options: JobOptions) -> PredictResult:
    """The polygons and areas of a mask an earlier run wrote (the image is not segmented again)."""
    import rasterio

    with rasterio.open(mask) as ds:
        width, height = ds.width, ds.height
    result = PredictResult(src, mask, width, height, 0, 0.0, notes=["the mask was there: polygons and areas from it"])
    return add_extras(result, options)


def _message(job: Job, e: Exception) -> str:
    """The failure's one line, naming the file when the message does not."""
    text = describe_failure(e)
    return text if str(job.input) in text or job.input.name in text else f"{job.input}: {text}"


def predict(predictor: Predictor, inputs: list[str], out: Path | None = None, *, recursive: bool = False,
            overwrite: bool = False, options: JobOptions = JobOptions(),
            on_event: Events = lambda kind, payload: None) -> Summary:
    """Predict every input (files, folders, globs) into `out` (a folder, or a file for one input);
    see `run_jobs` for the events."""
    found = prepare(inputs, out, recursive)
    return run_predict(predictor, found.jobs, found.failed, found.ignored, overwrite=overwrite, options=options,
                       on_event=on_event)


def run_predict(predictor: Predictor, jobs: list[Job], failed: list[Failure] = (), ignored: list[Failure] = (), *,
                overwrite: bool = False, options: JobOptions = JobOptions(),
                on_event: Events = lambda kind, payload: None) -> Summary:
    """Run `jobs` (from `bigseg.run.discover.prepare`); `failed`: inputs that named nothing;
    `ignored`: bigseg's own outputs among the inputs (reported, not segmented)."""
    summary = Summary(failed=list(failed), ignored=list(ignored))
    rank = distributed.rank_from_env()

    def one_file(job: Job, say: Events) -> PredictResult:
        if job.output.exists() and not overwrite:  # the mask is there: only its polygons or areas are missing
            return extras_of_mask(job.input, job.output, options)
        return add_extras(predict_file(predictor, job.input, job.output, options, say), options)

    finished = lambda job: job.output.exists() and all(p.exists() for p in extra_paths(job.output, options))
    if not rank.active:
        summary.add(run_jobs(jobs, one_file, overwrite, on_event, finished=finished))
        return summary
    # under torchrun: this rank's share, then everyone's outcome (gloo carries only small objects)
    distributed.init(rank, "gloo")
    if len(jobs) >= rank.world:
        mine = run_jobs(jobs[rank.rank::rank.world], one_file, overwrite, on_event, finished=finished)
    else:
        def split(job: Job, say: Events) -> PredictResult | None:  # one raster cut into parts; the main rank reports
            result = predict_split(predictor, job, rank, options)
            return None if result is None else add_extras(result, options)

        mine = run_jobs(jobs, split, overwrite, on_event, speak=rank.main, finished=finished)
    for other in distributed.gather(rank, mine):
        summary.add(other)
    distributed.shutdown(rank)
    if not rank.main:  # rank 0 reports; the others only share the exit status
        summary.done, summary.skipped = [], []
        summary.failed = [Failure(f.input, "") for f in summary.failed]
    return summary
