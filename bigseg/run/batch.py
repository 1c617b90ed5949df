"""Batch predict: every input of a command line, in one job loop: skip finished outputs, continue
past bad files, report each in a summary. Under torchrun the jobs are shared between processes
(whole files round-robin, or each raster cut into parts, `bigseg.run.shards`)."""
from __future__ import annotations

from pathlib import Path

from bigseg import distributed
from bigseg.infer.predictor import Predictor
from bigseg.io.outputs import output_paths
from bigseg.run.discover import Failure, Job, prepare
from bigseg.run.file_job import JobOptions, PredictResult, predict_file
from bigseg.run.jobs import Events, Summary, run_jobs
from bigseg.run.shards import predict_split
from bigseg.run.vectorize import from_mask


def predict(predictor: Predictor, inputs: list[str], out: Path | None = None, *, recursive: bool = False,
            overwrite: bool = False, options: JobOptions = JobOptions(),
            on_event: Events = lambda kind, payload: None) -> Summary:
    """Predict every input (files, folders, globs) into `out` (a folder, or a file for one input);
    see `run_jobs` for the events."""
    found = prepare(inputs, out, recursive, options.read.asset)
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
        if job.output.exists() and not overwrite:  # the mask is there: only files made from it are missing
            return from_mask(job.input, job.output, options.write)
        return predict_file(predictor, job.input, job.output, options, say)

    finished = lambda job: all(p.exists() for p in output_paths(job.output, options.write))
    if not rank.active:
        summary.add(run_jobs(jobs, one_file, overwrite, on_event, finished=finished))
        return summary
    # under torchrun: this rank's share, then everyone's outcome (gloo carries only small objects)
    distributed.init(rank, "gloo")
    if len(jobs) >= rank.world:
        mine = run_jobs(jobs[rank.rank::rank.world], one_file, overwrite, on_event, finished=finished)
    else:
        split = lambda job, say: predict_split(predictor, job, rank, options)  # one raster in parts; rank 0 reports
        mine = run_jobs(jobs, split, overwrite, on_event, speak=rank.main, finished=finished)
    for other in distributed.gather(rank, mine):
        summary.add(other)
    distributed.shutdown(rank)
    if not rank.main:  # rank 0 reports; the others only share the exit status
        summary.done, summary.skipped = [], []
        summary.failed = [Failure(f.input, "") for f in summary.failed]
    return summary
