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


class _Display:
    """A rich progress display on a terminal (unless quiet); plain stderr lines otherwise."""

    def __init__(self, quiet: bool, *columns, transient: bool = False):
        self.quiet = quiet
        live = err.is_terminal and not quiet
        self.progress = Progress(*columns, console=err, transient=transient) if live else None
        self.task = None

    def __enter__(self):
        if self.progress:
            self.progress.__enter__()
        return self

    def __exit__(self, *exc):
        if self.progress:
            self.progress.__exit__(*exc)

    def line(self, message: str) -> None:
        if self.quiet:
            return
        if self.progress:
            self.progress.console.print(message, markup=False)
        else:
            print(message, file=sys.stderr, flush=True)


class TileProgress(_Display):
    """Per-file progress: tiles/s and megapixels/s. Rich bar on a TTY, one line per file otherwise."""

    def __init__(self, quiet: bool = False):
        super().__init__(quiet, TextColumn("{task.description}"), BarColumn(),
                         TextColumn("{task.completed}/{task.total} tiles"), TextColumn("{task.fields[rate]}"),
                         TimeRemainingColumn(), transient=True)

    def start(self, name: str, tile_pixels: int) -> None:
        self.t0, self.tile_pixels = time.perf_counter(), tile_pixels
        if self.progress:
            self.task = self.progress.add_task(name, total=None, rate="")

    def tile(self, done: int, total: int) -> None:
        if self.progress:
            dt = max(time.perf_counter() - self.t0, 1e-9)
            rate = f"{done / dt:.1f} tiles/s {done * self.tile_pixels / dt / 1e6:.2f} MP/s"
            self.progress.update(self.task, completed=done, total=total, rate=rate)

    def finish(self) -> None:
        if self.progress and self.task is not None:
            self.progress.remove_task(self.task)
            self.task = None


class TrainProgress(_Display):
    """Epoch/step/loss/lr/images-per-second/ETA; a live line on a terminal, a line per epoch otherwise."""

    def __init__(self, quiet: bool, epochs: int):
        super().__init__(quiet, TextColumn("{task.description}"), BarColumn(), TextColumn("{task.fields[info]}"),
                         TimeRemainingColumn())
        self.epochs = epochs

    def event(self, kind: str, info: dict) -> None:
        if self.quiet:
            return
        if kind == "start":
            total = info["total_steps"]
            self.line(f"training on {info['train_images']} images, {info['steps_per_epoch']} steps/epoch, "
                      f"{info['world']} process(es)")
            if self.progress:
                self.task = self.progress.add_task("train", total=total, info="",
                                                   completed=info["epoch"] * info["steps_per_epoch"])
        elif kind == "step" and self.progress:
            self.progress.update(self.task, completed=info["global_step"], description=f"epoch {info['epoch'] + 1}",
                                 info=f"loss {info['loss']:.3f} lr {info['lr']:.2e} {info['images_per_s']:.1f} img/s")
        elif kind == "epoch":
            val = f" val mIoU {100 * info['val_miou']:.2f}" if "val_miou" in info else ""
            loss = "n/a" if info["train_loss"] is None else f"{info['train_loss']:.4f}"
            self.line(f"epoch {info['epoch']}/{self.epochs}: loss {loss}{val} ({info['seconds']:.0f} s)"
                      f"{' *best*' if info.get('best') else ''}")
        elif kind == "stopped":
            self.line(f"stopped ({info['why']}) at epoch {info['epoch'] + 1} step {info['step']}; "
                      f"continue with --resume")


def print_plans(plans: list, as_json: bool = False) -> None:
    """`predict --dry-run`: one block per input, or a JSON list on stdout."""
    from rich.markup import escape

    if as_json:
        import json

        print(json.dumps([p.to_dict() for p in plans], indent=2))
        return
    for p in plans:
        m = p.memory_mib
        out.print(f"[bold]{escape(p.input)}[/bold] -> {escape(p.output)}")
        out.print(f"  input     {p.width}x{p.height} ({p.width * p.height / 1e6:.1f} MP), {p.bands} bands used, "
                  f"read with {p.reader}")
        out.print(f"  tiles     {p.tiles} ({p.tile_rows} rows x {p.tile_cols} columns) of {p.tile} px, "
                  f"{p.batches} batches on {p.device} ({p.precision})")
        out.print(f"  overlap   {p.overlap} px, {p.overlap_from}")
        out.print(f"  blend     {p.blend}")
        for o in p.outputs:
            extra = ", BigTIFF" if o["bigtiff"] else ""
            out.print(f"  output    {escape(o['path'])}: {o['format']}, {o['bands']} band(s){extra}")
        gpu = "" if m.get("gpu") is None else \
            f", GPU {m['gpu']:.0f} MiB (activations {m['gpu_activations']:.0f}, stitcher {m['gpu_stitcher']:.0f})"
        terms = ", ".join(f"{k} {v:.0f}" for k, v in m.items() if not k.startswith(("host", "gpu")))
        out.print(escape(f"  memory    host {m['host']:.0f} MiB{gpu}  [{terms}]"))
        if p.estimate_seconds is not None:
            out.print(f"  time      about {p.estimate_seconds:.1f} s "
                      f"({p.width * p.height / 1e6 / max(p.estimate_seconds, 1e-9):.2f} MP/s, from a warm-up)")
        for n in p.notes:
            out.print(f"  note      {escape(n)}")
