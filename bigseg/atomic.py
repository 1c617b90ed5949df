"""Writing files atomically: everything bigseg writes goes to a temporary name in the same folder
and is renamed when complete, so an interrupted run never leaves a file that looks finished."""
from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


def partial_path(path: Path) -> Path:
    """The temporary name beside `path`; keeps the suffix so format-sniffing writers still work."""
    return path.with_name(f".{path.stem}.partial{path.suffix}")


def remove(path: Path) -> None:
    """Delete `path` if it exists."""
    try:
        path.unlink()
    except FileNotFoundError:
        pass


def commit(tmp: Path, path: Path, durable: bool = False) -> Path:
    """Rename the finished `tmp` to `path` (after an fsync with `durable`)."""
    if durable:
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    os.replace(tmp, path)
    return path


@contextmanager
def atomic_path(path: str | Path, durable: bool = False) -> Iterator[Path]:
    """Yield a temporary path to write `path` to; renamed on success, removed on any error."""
    path = Path(path)
    tmp = partial_path(path)
    try:
        yield tmp
    except BaseException:
        remove(tmp)
        raise
    commit(tmp, path, durable)


def write_text(path: str | Path, text: str, durable: bool = False) -> Path:
    """Write `text` to `path` atomically."""
    with atomic_path(path, durable) as tmp:
        tmp.write_text(text)
    return Path(path)
