"""Batch predict: every input of a command line, in one job loop: skip finished outputs, continue
past bad files, report each in a summary. Under torchrun the jobs are shared between processes
(whole files round-robin, or each raster cut into parts, `bigseg.run.shards`)."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from bigseg import distributed
from bigseg.errors import describe_failure
from bigseg.run.discover import Failure, Job, prepare
from bigseg.run.file_job import JobOptions, PredictResult, predict_file
from bigseg.run.shards import predict_split

if TYPE_CHECKING:  # the torch predictor, or the exported one (`bigseg.exported`) that needs no torch
    from bigseg.predictor import Predictor

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
             on_event: Events, speak: bool = True) -> Summary:
    """The job loop: `work(job, on_event)` for every job whose output is missing (or all with
    `overwrite`). Events (when `speak`): start(job), tile((done, total)), note(message),
    done(result), skip(job), fail(failure)."""
    summary = Summary()
    say = on_event if speak else (lambda kind, payload: None)
    for job in jobs:
        if job.output.exists() and not overwrite:
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
    one_file = lambda job, say: predict_file(predictor, job.input, job.output, options, say)
    if not rank.active:
        summary.add(run_jobs(jobs, one_file, overwrite, on_event))
        return summary
    # under torchrun: this rank's share, then everyone's outcome (gloo carries only small objects)
    distributed.init(rank, "gloo")
    if len(jobs) >= rank.world:
        mine = run_jobs(jobs[rank.rank::rank.world], one_file, overwrite, on_event)
    else:
        mine = run_jobs(jobs, lambda job, say: predict_split(predictor, job, rank, options), overwrite,
                        on_event, speak=rank.main)
    for other in distributed.gather(rank, mine):
        summary.add(other)
    distributed.shutdown(rank)
    if not rank.main:  # rank 0 reports; the others only share the exit status
        summary.done, summary.skipped = [], []
        summary.failed = [Failure(f.input, "") for f in summary.failed]
    return summary
