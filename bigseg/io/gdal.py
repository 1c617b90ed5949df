"""The GDAL settings every bigseg job runs under (entered once per job, around readers and writers),
and writes through GDAL whose failures are said in words (`writing`)."""
from __future__ import annotations

import contextlib
import os
import shutil
import sys
import tempfile
from pathlib import Path

from bigseg.errors import OutputError, first_line

try:
    import resource  # POSIX: the file size limit (ulimit -f)
except ImportError:  # Windows
    resource = None

GDAL_CACHE_MB = 64  # GDAL's default is 5% of RAM, which would make memory grow with image size


def gdal_env(threads: int = 1, remote: bool = False):
    """A rasterio environment: a bounded block cache, masks stored inside the TIFF, and with
    `threads` > 1 GDAL's worker threads: a windowed read decodes the blocks it spans in parallel
    (GeoTIFF, GDAL >= 3.6) and a GeoTIFF's blocks are compressed in parallel as they are written.
    `remote`: the settings of remote inputs too (`bigseg.io.remote.REMOTE_GDAL`)."""
    import rasterio

    mb = int(os.environ.get("GDAL_CACHEMAX", GDAL_CACHE_MB))
    options = {
        # rasterio hands an integer GDAL_CACHEMAX to GDAL in bytes (64 would be a 64-byte cache, and
        # every decimated or windowed read would decode its blocks again); values below 100000 are
        # megabytes, as GDAL itself reads the option
        "GDAL_CACHEMAX": mb * 2 ** 20 if mb < 100_000 else mb,
        "GDAL_TIFF_INTERNAL_MASK": True,
    }
    if threads > 1:
        options["GDAL_NUM_THREADS"] = str(threads)
    if remote:
        from bigseg.io.remote import REMOTE_GDAL

        options.update({k: os.environ.get(k, v) for k, v in REMOTE_GDAL.items()})  # the user's own settings win
    return rasterio.Env(**options)


@contextlib.contextmanager
def captured_stderr():
    """What C libraries print straight to the process's stderr meanwhile (libtiff's and libpng's
    messages bypass GDAL's, rasterio's and OpenCV's handlers), captured instead of printed: the
    list yielded holds those lines once the block ends."""
    printed: list[str] = []
    sys.stderr.flush()
    saved = os.dup(2)
    capture = tempfile.TemporaryFile()
    os.dup2(capture.fileno(), 2)
    try:
        yield printed
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        capture.seek(0)
        printed += [line for line in capture.read().decode(errors="replace").splitlines() if line.strip()]
        capture.close()


@contextlib.contextmanager
def writing(path: Path, partial: Path | None = None):
    """Around a write of `path` (its temporary file `partial`): the C libraries' own messages are
    captured, a failed write becomes one OutputError that names the cause in words (a full disk,
    the file size limit), and the messages of a write that succeeds are passed on."""
    failure: Exception | None = None
    with captured_stderr() as printed:
        try:
            yield
        except OutputError:
            raise
        except Exception as e:  # rasterio's, GDAL's and the OS's own types
            failure = e
    if failure is not None:
        raise OutputError(f"cannot write {path}: {write_failure(partial or path, failure, printed)}") from None
    if printed:
        print("\n".join(printed), file=sys.stderr)


def write_failure(path: Path, error: BaseException | None = None, printed: list[str] = ()) -> str:
    """Why writing `path` (the file as far as it got) failed, in words: a full disk, a file size
    limit, or the first reason given."""
    import errno

    text = "\n".join([*printed, str(error or "")])
    code = getattr(error, "errno", None)
    free = _free(path)
    if code in (errno.ENOSPC, errno.EDQUOT) or "No space left" in text or "Disk quota" in text or \
            (free is not None and free < 2 ** 20):
        left = "" if free is None else f" ({free / 2 ** 20:.1f} MiB free)"
        return f"the disk is full{left}; free some space or write elsewhere (--out)"
    limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0] if resource is not None else None
    limited = limit is not None and limit != resource.RLIM_INFINITY
    if code == errno.EFBIG or "File too large" in text or (limited and _size(path) >= limit - 65536):
        if limited:
            return (f"the file size limit was reached (ulimit -f: {_bytes(limit)}); raise it (ulimit -f unlimited) "
                    f"or write smaller files")
        return "the file system's largest file size was reached; write to another file system"
    said = printed[0] if printed else first_line(error) if error is not None else "the encoder refused it"
    if limited:  # an encoder that names no cause (libpng's "Write Error") under a file size limit
        return f"{said}: likely the file size limit (ulimit -f: {_bytes(limit)}); raise it (ulimit -f unlimited)"
    return said


def _free(path: Path) -> float | None:
    """Bytes free where `path` is written; None where that cannot be told."""
    try:
        return shutil.disk_usage(Path(path).parent).free
    except OSError:
        return None


def _size(path: Path) -> int:
    try:
        return Path(path).stat().st_size
    except OSError:
        return 0


def _bytes(n: float) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"
