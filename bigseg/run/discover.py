"""Inputs to jobs: expand files, folders and globs, pair each input with its output path, and check
that the output folders can be written before any work starts. bigseg's own outputs (masks,
probabilities, overlays, partial files: by name, or by the tag bigseg writes into its GeoTIFFs)
are never inputs, whether named one by one, by a glob or in a folder; hidden files in a folder
are passed over. URLs and GDAL's /vsi paths are inputs as files are (`bigseg.io.remote`), a STAC
item stands for one of its assets (`bigseg.io.stac`), and a text file of inputs (`.txt`, one path
or URL per line) is a batch of them."""
from __future__ import annotations

import glob
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from bigseg.errors import InputError, OutputError
from bigseg.io.outputs import check_mask_file, mask_path, names_one_file, output_kind
from bigseg.io.readers import IMAGE_SUFFIXES, RASTER_SUFFIXES
from bigseg.io.remote import RemotePath, is_remote
from bigseg.io.stac import is_stac_item, stac_asset

INPUT_SUFFIXES = IMAGE_SUFFIXES | RASTER_SUFFIXES


@dataclass
class Job:
    input: Path | RemotePath
    output: Path


@dataclass
class Failure:
    """An input that failed: `error` is the whole line; an error about a parameter also keeps it
    apart (`param`, `reason`) so the CLI can name its option."""

    input: str
    error: str
    param: str | None = None
    reason: str | None = None


@dataclass
class Found:
    """The jobs of a command line, the inputs that failed before any work (named nothing, or
    clashing outputs), and bigseg's own outputs passed over (each with why: said as a note)."""

    jobs: list[Job] = field(default_factory=list)
    failed: list[Failure] = field(default_factory=list)
    ignored: list[Failure] = field(default_factory=list)


def expand_inputs(inputs: list[str], recursive: bool, asset: str | None = None
                  ) -> tuple[list[tuple[Path, Path]], list[Failure], list[Failure]]:
    """(file, relative name for the output) pairs, in a stable order; the inputs that name nothing;
    bigseg's outputs among them (never segmented again). A STAC item stands for its `asset` (or
    its visual one), named by the item's id."""
    found: list[tuple[Path, Path]] = []
    failures: list[Failure] = []
    ignored: list[Failure] = []

    def keep(p: Path) -> bool:
        kind = output_kind(p)
        if kind is not None:
            ignored.append(Failure(str(p), f"{p}: skipped, {kind} bigseg wrote (not segmented again)"))
        return kind is None

    for item in listed(inputs):
        if is_stac_item(item) and (is_remote(item) or Path(item).expanduser().is_file()):
            try:
                href, item_id = stac_asset(item, asset)
            except InputError as e:
                failures.append(Failure(item, str(e), e.param, e.reason))
                continue
            src = RemotePath(href) if is_remote(href) else Path(href)
            found.append((src, Path(f"{item_id}{src.suffix or '.tif'}")))
            continue
        if is_remote(item):
            remote = RemotePath(item)
            if keep(remote):
                found.append((remote, Path(remote.name or "remote")))
            continue
        path = Path(item).expanduser()
        if path.is_dir():
            pattern = "**/*" if recursive else "*"
            files = sorted(p for p in path.glob(pattern) if p.is_file() and p.suffix.lower() in INPUT_SUFFIXES
                           and not any(part.startswith(".") for part in p.relative_to(path).parts))
            files = [p for p in files if keep(p)]
            if not files and not ignored:
                failures.append(Failure(item, f"{item}: no images in this folder (looked for "
                                              f"{', '.join(sorted(INPUT_SUFFIXES))}"
                                              f"{'' if recursive else '; --recursive to look in subfolders'})"))
            found += [(p, p.relative_to(path)) for p in files]
        elif path.exists():
            if keep(path):
                found.append((path, Path(path.name)))
        elif path.is_symlink():
            failures.append(Failure(item, f"{item}: a symbolic link that leads nowhere (a loop or a missing target)"))
        elif glob.has_magic(item):
            files = sorted(Path(p) for p in glob.glob(item, recursive=recursive) if Path(p).is_file())
            if not files:
                failures.append(Failure(item, f"no file matches {item}"))
            found += [(p, Path(p.name)) for p in files if keep(p)]
        else:
            failures.append(Failure(item, f"input not found: {item}"))
    return found, failures, ignored


def listed(inputs: list[str]) -> list[str]:
    """`inputs` with each text file of inputs (`NAME.txt`) replaced by its lines: one path or URL
    per line, blank lines and `#` comments skipped, relative paths taken from the list's folder."""
    out = []
    for item in inputs:
        path = Path(item).expanduser()
        if not is_remote(item) and path.suffix.lower() == ".txt" and path.is_file():
            for line in path.read_text(errors="replace").splitlines():
                line = line.strip()
                if line and not line.startswith("#"):
                    out.append(line if is_remote(line) or Path(line).expanduser().is_absolute()
                               else str(path.parent / line))
        else:
            out.append(item)
    return out


def plan_jobs(found: list[tuple[Path, Path]], out: Path | None) -> tuple[list[Job], list[Failure]]:
    """Output paths: `--out FILE` for one input, else `<out>/<relative stem>.mask.{tif,png}`."""
    if out is not None and len(found) == 1 and names_one_file(out):
        src = found[0][0]
        check_mask_file(src, out)
        return [Job(src, out)], []
    folder = out or Path.cwd()
    if names_one_file(folder) and len(found) > 1:
        raise InputError(f"{folder} names one file but there are {len(found)} inputs; give a folder", param="out")
    jobs, failures, seen = [], [], {}
    for src, rel in found:
        dst = mask_path(src, rel, folder)
        if dst in seen:
            failures.append(Failure(str(src), f"{src}: output {dst} would overwrite the one for {seen[dst]}"))
            continue
        seen[dst] = src
        jobs.append(Job(src, dst))
    return jobs, failures


def find_jobs(inputs: list[str], out: Path | None, recursive: bool, asset: str | None = None) -> Found:
    """`expand_inputs` then `plan_jobs`."""
    found, failed, ignored = expand_inputs(inputs, recursive, asset)
    jobs, more = plan_jobs(found, out)
    return Found(jobs, failed + more, ignored)


def prepare(inputs: list[str], out: Path | None, recursive: bool, asset: str | None = None) -> Found:
    """`find_jobs`, then check that every output folder can be written (OutputError if not)."""
    found = find_jobs(inputs, out, recursive, asset)
    for folder in sorted({job.output.parent for job in found.jobs}):
        check_writable(folder)
    return found


def check_writable(folder: Path) -> None:
    """Fail before any work if outputs cannot be created in `folder`."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".bigseg-write-test-"):
            pass
    except OSError as e:
        raise OutputError(f"cannot write to output folder {folder}: {e.strerror or e}") from None
