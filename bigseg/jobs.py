"""Batch predict: expand files, folders and globs to inputs, map them to outputs, run each one,
skip finished outputs, continue past bad files and report them in a summary."""
from __future__ import annotations

import glob
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from bigseg import sharding
from bigseg.errors import BigsegError, InputError, OutputError
from bigseg.inference import PredictResult, ReadOptions, Segmenter, WriteOptions
from bigseg.io.readers import IMAGE_SUFFIXES, RASTER_SUFFIXES

INPUT_SUFFIXES = IMAGE_SUFFIXES | RASTER_SUFFIXES
MASK_SUFFIXES = (".tif", ".tiff", ".png")


@dataclass
class Job:
    input: Path
    output: Path


@dataclass
class Failure:
    input: str
    error: str


@dataclass
class Summary:
    done: list[PredictResult] = field(default_factory=list)
    skipped: list[Job] = field(default_factory=list)
    failed: list[Failure] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.failed


def _is_output_of_ours(path: Path) -> bool:
    return any(part in path.name for part in (".mask.", ".probs.", ".overlay.", ".partial"))


def expand_inputs(inputs: list[str], recursive: bool) -> tuple[list[tuple[Path, Path]], list[Failure]]:
    """(file, relative name for the output) pairs, in a stable order, and the inputs that name nothing."""
    found: list[tuple[Path, Path]] = []
    failures: list[Failure] = []
    for item in inputs:
        path = Path(item).expanduser()
        if path.is_dir():
            pattern = "**/*" if recursive else "*"
            files = sorted(p for p in path.glob(pattern) if p.is_file()
                           and p.suffix.lower() in INPUT_SUFFIXES and not _is_output_of_ours(p))
            if not files:
                failures.append(Failure(item, f"{item}: no images in this folder (looked for "
                                              f"{', '.join(sorted(INPUT_SUFFIXES))}"
                                              f"{'' if recursive else '; --recursive to look in subfolders'})"))
            found += [(p, p.relative_to(path)) for p in files]
        elif path.exists():
            found.append((path, Path(path.name)))
        elif glob.has_magic(item):
            files = sorted(Path(p) for p in glob.glob(item, recursive=recursive) if Path(p).is_file())
            if not files:
                failures.append(Failure(item, f"no file matches {item}"))
            found += [(p, Path(p.name)) for p in files]
        else:
            failures.append(Failure(item, f"input not found: {item}"))
    return found, failures


def plan_jobs(found: list[tuple[Path, Path]], out: Path | None) -> tuple[list[Job], list[Failure]]:
    """Output paths: `--out FILE` for one input, else `<out>/<relative stem>.mask.{tif,png}`."""
    if out is not None and len(found) == 1 and out.suffix.lower() in MASK_SUFFIXES and not out.is_dir():
        src = found[0][0]
        if out.suffix.lower() == ".png" and src.suffix.lower() not in IMAGE_SUFFIXES:
            raise InputError(f"--out {out}: {src.name} is written as a GeoTIFF (it keeps georeferencing "
                             f"and streams); use a .tif name")
        if out.resolve() == src.resolve():
            raise InputError(f"--out {out} is the input itself; choose another name")
        return [Job(src, out)], []
    folder = out or Path.cwd()
    if folder.suffix.lower() in MASK_SUFFIXES and not folder.is_dir() and len(found) > 1:
        raise InputError(f"--out {folder} names one file but there are {len(found)} inputs; give a folder")
    jobs, failures, seen = [], [], {}
    for src, rel in found:
        ext = ".png" if src.suffix.lower() in IMAGE_SUFFIXES else ".tif"
        dst = folder / rel.parent / f"{rel.stem}.mask{ext}"
        if dst in seen:
            failures.append(Failure(str(src), f"{src}: output {dst} would overwrite the one for {seen[dst]}"))
            continue
        seen[dst] = src
        jobs.append(Job(src, dst))
    return jobs, failures


def check_writable(folder: Path) -> None:
    """Fail before any work if outputs cannot be created in `folder`."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".bigseg-write-test-"):
            pass
    except OSError as e:
        raise OutputError(f"cannot write to output folder {folder}: {e.strerror or e}") from None


def run_predict(segmenter: Segmenter, inputs: list[str], out: Path | None, *, recursive: bool = False,
                overwrite: bool = False, read: ReadOptions = ReadOptions(),
                write: WriteOptions = WriteOptions(),
                on_event: Callable[[str, object], None] = lambda kind, payload: None) -> Summary:
    """Predict every input; events: start(job), tile((done, total)), done(result), skip(job), fail(failure)."""
    summary = Summary()
    found, summary.failed = expand_inputs(inputs, recursive)
    jobs, failed = plan_jobs(found, out)
    summary.failed += failed
    for folder in sorted({job.output.parent for job in jobs}):
        check_writable(folder)
    rank = sharding.rank_from_env()
    if rank.active:  # under torchrun: this rank's share, then everyone's outcome
        sharding.init(rank)
        mine = sharding.run_distributed(segmenter, jobs, rank, read, write, overwrite, on_event)
        for done, skipped, failures in sharding.gather(rank, mine):
            summary.done += done
            summary.skipped += skipped
            summary.failed += failures
        sharding.shutdown(rank)
        if rank.rank != 0:  # rank 0 reports; the others only share the exit status
            summary.done, summary.skipped = [], []
            summary.failed = [Failure(f.input, "") for f in summary.failed]
        return summary
    for job in jobs:
        if job.output.exists() and not overwrite:
            summary.skipped.append(job)
            on_event("skip", job)
            continue
        job.output.parent.mkdir(parents=True, exist_ok=True)
        on_event("start", job)
        try:
            result = segmenter.predict_file(job.input, job.output, read, write,
                                            on_tile=lambda done, total: on_event("tile", (done, total)))
        except BigsegError as e:
            failure = Failure(str(job.input), str(e))
            summary.failed.append(failure)
            on_event("fail", failure)
            continue
        summary.done.append(result)
        on_event("done", result)
    return summary


def dry_run(segmenter: Segmenter, inputs: list[str], out: Path | None, *, recursive: bool = False,
            read: ReadOptions = ReadOptions(), write: WriteOptions = WriteOptions(),
            estimate: bool = False) -> tuple[list, list[Failure]]:
    """The plan of every job (`bigseg.plan.Plan`) without running the model (except a short
    timed warm-up with `estimate`); unreadable inputs are failures, as in a real run."""
    from bigseg.plan import plan_file

    found, failed = expand_inputs(inputs, recursive)
    jobs, more = plan_jobs(found, out)
    failed += more
    plans = []
    for job in jobs:
        try:
            plans.append(plan_file(segmenter, job.input, job.output, read, write, segmenter.overlap_from,
                                   estimate))
        except BigsegError as e:
            failed.append(Failure(str(job.input), str(e)))
    return plans, failed


__all__ = ["Job", "Failure", "Summary", "dry_run", "expand_inputs", "plan_jobs", "run_predict"]
