"""Terminal output for the CLI: a rich progress bar on a terminal, plain progress lines at a
steady interval otherwise (logs, nohup, SLURM), errors as one `Error:` line. Only the CLI imports
this module (and rich)."""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

from bigseg.cli.options import flag
from bigseg.errors import BigsegError

err = Console(stderr=True, highlight=False, soft_wrap=True)
out = Console(highlight=False, soft_wrap=True)
PLAIN_EVERY_SECONDS = 30.0  # plain progress lines: at most this often ...
PLAIN_EVERY_FRACTION = 0.05  # ... or at every 5% of the work, whichever comes later

_printed: set[str] = set()


def error(message: str) -> None:
    err.print(f"[bold red]Error:[/] {escape(message)}", markup=True) if err.is_terminal else print(
        f"Error: {message}", file=sys.stderr)


def error_line(e: BaseException | str) -> None:
    """One `Error:` line per distinct message; a library error about a parameter names the option."""
    if isinstance(e, BigsegError) and e.param:
        message = f"{flag(e.param)} {e.reason}"
    else:
        message = str(e)
    if message and message not in _printed:
        _printed.add(message)
        error(message)


def failure_line(failure) -> None:
    """One `Error:` line for a file that failed (`bigseg.run.discover.Failure`); an error about a
    parameter names the option, and the line names the file."""
    message = failure.error
    if failure.param:
        message = f"{flag(failure.param)} {failure.reason}"
        if failure.input not in message and Path(failure.input).name not in message:
            message = f"{failure.input}: {message}"
    if message and message not in _printed:
        _printed.add(message)
        error(message)


def note(message: str, quiet: bool = False) -> None:
    if not quiet:
        print(message, file=sys.stderr, flush=True)


def _shorten(text: str, width: int) -> str:
    """`text` in at most `width` characters, its middle elided."""
    if len(text) <= width:
        return text
    keep = width - 1
    return text[:keep - keep // 2] + "…" + text[-(keep // 2):]


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}" if seconds >= 3600 else \
        f"{seconds // 60}:{seconds % 60:02d}"


class _Display:
    """A rich progress display on a terminal (unless quiet); plain stderr lines otherwise."""

    def __init__(self, quiet: bool, *columns, transient: bool = False, console: Console | None = None):
        self.quiet = quiet
        console = console or err
        live = console.is_terminal and not quiet
        self.progress = Progress(*columns, console=console, transient=transient) if live else None
        self.task = None
        self._last_plain = 0.0
        self._last_fraction = 0.0

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

    def plain_due(self, fraction: float) -> bool:
        """Whether a plain progress line is due (no terminal): every PLAIN_EVERY_SECONDS, and at
        least PLAIN_EVERY_FRACTION of the work since the last one."""
        if self.progress is not None or self.quiet:
            return False
        now = time.monotonic()
        if now - self._last_plain < PLAIN_EVERY_SECONDS or fraction - self._last_fraction < PLAIN_EVERY_FRACTION:
            return False
        self._last_plain, self._last_fraction = now, fraction
        return True


class TileProgress(_Display):
    """Per-file progress: tiles, megapixels/s and the time left. Rich bar on a terminal (it keeps a
    usable bar and the whole time left at 80 columns); otherwise a plain line every 30 s (and 5%)
    and one line per finished file. The speed counts only the tiles of this run: a resumed file's
    tiles done before do not make it look faster."""

    NAME_WIDTH = 24

    def __init__(self, quiet: bool = False, console: Console | None = None):
        super().__init__(quiet, TextColumn("{task.description}"), BarColumn(bar_width=None),
                         TextColumn("{task.completed}/{task.total}"), TextColumn("{task.fields[rate]}"),
                         TimeRemainingColumn(compact=True, elapsed_when_finished=True), transient=True,
                         console=console)
        self.name = ""

    def start(self, name: str, tile_pixels: int) -> None:
        self.t0, self.tile_pixels, self.name = time.perf_counter(), tile_pixels, name
        self._last_plain, self._last_fraction = time.monotonic(), 0.0
        self.first: int | None = None  # tiles already done when this run started (a resumed file)
        if self.progress:
            self.task = self.progress.add_task(_shorten(name, self.NAME_WIDTH), total=None, rate="")

    def tile(self, done: int, total: int) -> None:
        if self.first is None:  # the first report of this run: the tiles before it are not its speed
            self.first = done - 1
        dt = max(time.perf_counter() - self.t0, 1e-9)
        ours = max(done - self.first, 0)
        rate = f"{ours * self.tile_pixels / dt / 1e6:.2f} MP/s"
        if self.progress:
            self.progress.update(self.task, completed=done, total=total, rate=rate)
        elif total and done < total and self.plain_due(done / total):
            left = dt / max(ours, 1) * (total - done)
            self.line(f"{self.name}: {done}/{total} tiles ({100 * done / total:.0f}%), "
                      f"{ours / dt:.2f} tiles/s, {rate}, about {_duration(left)} left")

    def note(self, message: str, *also: str) -> None:
        """`note: MESSAGE`, once: not again when it (or any of `also`) was said before."""
        said = self.__dict__.setdefault("_said", set())
        if said.isdisjoint({message, *also}):
            said.update({message, *also})
            self.line(message if message.startswith("warning: ") else f"note: {message}")

    def finish(self) -> None:
        if self.progress and self.task is not None:
            self.progress.remove_task(self.task)
            self.task = None


class TrainProgress(_Display):
    """Epoch/step/loss/lr/images-per-second/ETA; a live line on a terminal, a line per epoch otherwise."""

    def __init__(self, quiet: bool, epochs: int):
        super().__init__(quiet, TextColumn("{task.description}"), BarColumn(), TextColumn("{task.fields[info]}"),
                         TimeRemainingColumn())
        self.epochs, self.total = epochs, 0

    def event(self, kind: str, info: dict) -> None:
        if self.quiet:
            return
        if kind == "resume" and info.get("finished"):
            self.line(f"the run has finished its {info['epochs']} epochs ({info['global_step']} steps): nothing to "
                      f"train; --resume --epochs N (more than {info['epochs']}) trains it on")
        elif kind == "resume":
            self.line(f"resuming from epoch {info['epoch'] + 1}, step {info['step']} "
                      f"({info['global_step']} steps done)")
        elif kind == "start":
            total = self.total = info["total_steps"]
            self._last_plain, self._last_fraction = time.monotonic(), info["epoch"] * info["steps_per_epoch"] / max(total, 1)
            on_device = info.get("data_on_device")
            self.line(f"training on {info['train_images']} {info.get('unit', 'images')}, {info['steps_per_epoch']} "
                      f"steps/epoch, "
                      f"{info['world']} process(es)"
                      + ("" if on_device is None else f", data on the device ({on_device / 2**20:.1f} MiB, augmented there)"))
            ckpt = "on" if info["grad_checkpoint"] else "off"
            if info["grad_checkpoint_auto"]:
                ckpt += " (default on a GPU)" if info["grad_checkpoint"] else " (default on the CPU; --grad-checkpoint saves memory)"
            weights = info.get("class_weights")
            self.line(f"{info['device']}, {info['precision']}, {info['threads']} thread(s), gradient checkpointing {ckpt}, "
                      f"{'channels-last' if info['channels_last'] else 'contiguous'}"
                      f"{', compiled' if info['compile'] else ''}, crops {'/'.join(map(str, info['crops']))}"
                      + ("" if weights is None else ", class weights " + " ".join(f"{w:.2f}" for w in weights)))
            if self.progress:
                self.task = self.progress.add_task("train", total=total, info="",
                                                   completed=info["epoch"] * info["steps_per_epoch"])
        elif kind == "step":
            text = f"loss {info['loss']:.3f} lr {info['lr']:.2e} {info['images_per_s']:.1f} img/s"
            if self.progress:
                self.progress.update(self.task, completed=info["global_step"], description=f"epoch {info['epoch'] + 1}",
                                     info=text)
            elif self.plain_due(info["global_step"] / max(self.total, 1)):
                self.line(f"epoch {info['epoch'] + 1}/{self.epochs} step {info['step']}: {text}")
        elif kind == "epoch":
            val = f" val mIoU {100 * info['val_miou']:.2f}" if "val_miou" in info else ""
            loss = "n/a" if info["train_loss"] is None else f"{info['train_loss']:.4f}"
            self.line(f"epoch {info['epoch']}/{self.epochs}: loss {loss}{val} ({info['seconds']:.0f} s)"
                      f"{' *best*' if info.get('best') else ''}")
        elif kind == "note":
            self.line(f"note: {info['text']}")
        elif kind == "teacher":
            who = "the teacher's" if info["teachers"] == 1 else f"the mean of {info['teachers']} teachers'"
            self.line(f"computing {who} targets for {info['images']} of {info['of']} images "
                      f"(scales {', '.join(f'{s:g}' for s in info['scales'])}{', flipped too' if info['flip'] else ''}"
                      f"{', turned too' if info.get('turns') else ''}); "
                      f"about {info['bytes'] / 1e9:.2f} GB, kept in the run folder")
        elif kind == "teacher_image":
            if info["done"] == info["images"] or info["done"] % 25 == 0:
                self.line(f"teacher: {info['done']}/{info['images']} images")
        elif kind == "stopped":
            self.line(f"{info['why']}: kept epoch {info['epoch'] + 1} step {info['step']} "
                      f"({info['global_step']} steps) in {info['path']}; continue with --resume")


def print_plans(plans: list, as_json: bool = False) -> None:
    """`predict --dry-run`: one block per input, or a JSON list on stdout."""
    if as_json:
        print(json.dumps([p.to_dict() for p in plans], indent=2))
        return
    for p in plans:
        m = p.memory_mib
        out.print(f"[bold]{escape(p.input)}[/bold] -> {escape(p.output)}")
        if p.model:
            out.print(f"  model     {escape(p.model)}")
        if p.engine:
            out.print(f"  engine    {escape(p.engine)}")
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
