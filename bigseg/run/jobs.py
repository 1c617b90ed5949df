"""The job loop every batch command shares (`bigseg predict`, `bigseg vectorize`): skip finished
outputs, continue past bad files, report each in a `Summary`."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from bigseg.errors import describe_failure
from bigseg.run.discover import Failure, Job

Events = Callable[[str, object], None]


@dataclass
class Summary:
    done: list[Any] = field(default_factory=list)
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


def run_jobs(jobs: list[Job], work: Callable[[Job, Events], Any], overwrite: bool,
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


def _message(job: Job, e: Exception) -> str:
    """The failure's one line, naming the file when the message does not."""
    text = describe_failure(e)
    return text if str(job.input) in text or job.input.name in text else f"{job.input}: {text}"
