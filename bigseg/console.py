"""Terminal output for the CLI: a rich progress bar on a terminal, plain log lines otherwise.
Only the CLI imports this module (and rich)."""
from __future__ import annotations

import sys
import time

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

err = Console(stderr=True, highlight=False, soft_wrap=True)
out = Console(highlight=False, soft_wrap=True)


def error(message: str) -> None:
    err.print(f"[bold red]Error:[/] {message}", markup=True) if err.is_terminal else print(
        f"Error: {message}", file=sys.stderr)


def note(message: str, quiet: bool = False) -> None:
    if not quiet:
        print(message, file=sys.stderr)


class TileProgress:
    """Per-file progress: tiles/s and megapixels/s. Rich bar on a TTY, one line per file otherwise."""

    def __init__(self, quiet: bool = False):
        self.quiet = quiet
        self.live = err.is_terminal and not quiet
        self.progress = Progress(TextColumn("{task.description}"), BarColumn(),
                                 TextColumn("{task.completed}/{task.total} tiles"),
                                 TextColumn("{task.fields[rate]}"), TimeRemainingColumn(),
                                 console=err, transient=True) if self.live else None
        self.task = None

    def __enter__(self):
        if self.progress:
            self.progress.__enter__()
        return self

    def __exit__(self, *exc):
        if self.progress:
            self.progress.__exit__(*exc)

    def start(self, name: str, tiles: int, tile_pixels: int) -> None:
        self.t0, self.done, self.tile_pixels = time.perf_counter(), 0, tile_pixels
        if self.progress:
            self.task = self.progress.add_task(name, total=tiles, rate="")

    def tile(self) -> None:
        self.done += 1
        if self.progress:
            dt = max(time.perf_counter() - self.t0, 1e-9)
            rate = f"{self.done / dt:.1f} tiles/s {self.done * self.tile_pixels / dt / 1e6:.2f} MP/s"
            self.progress.update(self.task, advance=1, rate=rate)

    def finish(self) -> None:
        if self.progress and self.task is not None:
            self.progress.remove_task(self.task)
            self.task = None

    def line(self, message: str) -> None:
        if self.quiet:
            return
        if self.progress:
            self.progress.console.print(message, markup=False)
        else:
            print(message, file=sys.stderr, flush=True)
