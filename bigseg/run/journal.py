"""Resume inside one image: a small journal beside the partial output records how many output
rows (from the top) are final on disk, under a fingerprint of the input and every setting that
shapes the result. A re-run with the same fingerprint continues from there; any difference
starts over.

The journal is `.NAME.journal.json` next to the output; it is written (atomically) only after
the partial outputs were closed with those rows in them, so it never claims more than the disk
holds, whatever kills the process. The rows it records are whole block rows of the GeoTIFF
writers, which write every block once (`bigseg.io.writers`): nothing it relies on changes later.
"""
from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Any

from bigseg.atomic import atomic_path

VERSION = 2  # 2: rows_done counts whole block rows (writers write each block once)


def journal_path(dst: Path) -> Path:
    return dst.with_name(f".{dst.name}.journal.json")


def fingerprint(src: Path, settings: dict[str, Any], identity: dict[str, Any] | None = None) -> str:
    """Input identity (by default the resolved path, size, modification time; a reader's own
    `identity()` for remote files) + settings + format version."""
    if identity is None:
        st = src.stat()
        identity = {"input": str(src.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns}
    blob = json.dumps({**identity, "settings": settings, "version": VERSION}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def read_journal(dst: Path) -> dict[str, Any] | None:
    """The journal of `dst`'s interrupted run, or None (absent or unreadable: start over)."""
    try:
        data = json.loads(journal_path(dst).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or not isinstance(data.get("rows_done"), int) or "fingerprint" not in data:
        return None
    return data


def write_journal(dst: Path, fp: str, rows_done: int, height: int) -> None:
    with atomic_path(journal_path(dst), durable=True) as tmp:
        tmp.write_text(json.dumps({"fingerprint": fp, "rows_done": rows_done, "height": height, "version": VERSION}))


def remove_journal(dst: Path) -> None:
    journal_path(dst).unlink(missing_ok=True)


class Advance:
    """When the journal of `dst` moves: at most every `every` seconds (None: never, an output that
    cannot resume), and only forward."""

    def __init__(self, dst: Path, fp: str, height: int, every: float | None, rows: int = 0):
        self.dst, self.fp, self.height, self.every, self.rows = dst, fp, height, every, rows
        self.last = time.monotonic()

    def due(self, rows_on_disk: int) -> bool:
        """Whether to sync the outputs and record `rows_on_disk` now."""
        return self.every is not None and time.monotonic() - self.last >= self.every and rows_on_disk > self.rows

    def to(self, rows: int) -> None:
        """Record that `rows` rows are final on disk (the outputs were synced)."""
        write_journal(self.dst, self.fp, rows, self.height)
        self.rows, self.last = rows, time.monotonic()
