"""The `bigseg` command: each subcommand parses its options, calls the library and prints.
Nothing else lives here; this package is the only one that imports typer and rich.

Start-up is kept light: torch is imported only by a command that needs it, after its options
and inputs were checked, so `--help`, `--version`, `bigseg models` and user mistakes answer at
once."""
from __future__ import annotations

import functools
import sys
import warnings

from bigseg.runtime import (
    prefer_passive_waiting,
    stop_handled,
    stop_on_terminate,
    stop_signal,
)

prefer_passive_waiting()  # before torch loads: OpenMP threads sleep instead of spinning when idle
# rasterio warns on every open of a raster without georeferencing (a photo, a pixel-grid mosaic):
# bigseg handles those, and its outputs then carry no georeferencing either
warnings.filterwarnings("ignore", message=r"(Dataset has no geotransform|The given matrix is equal to Affine)")

import typer

from bigseg import __version__
from bigseg.cli import evaluate, listing, predict, train, vectorize
from bigseg.cli.render import error_line, note
from bigseg.errors import BigsegError

app = typer.Typer(name="bigseg", help="Semantic segmentation of very large images.",
                  no_args_is_help=True, pretty_exceptions_enable=False, rich_markup_mode=None,
                  context_settings={"max_content_width": 100})


def _version(value: bool) -> None:
    if value:
        print(f"bigseg {__version__}")
        raise typer.Exit()


@app.callback()
def root(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                      help="Print the version and exit.")) -> None:
    """Segment megapixel photos to gigapixel orthomosaics; train and evaluate the models."""




def _guarded(command):
    """A command whose user mistakes are one `Error:` line (exit 1) and whose Ctrl-C or SIGTERM says
    what was kept (exit 130 or 143); Typer would otherwise end an interrupted command silently."""
    @functools.wraps(command)
    def run(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except BigsegError as e:
            error_line(e)
            raise typer.Exit(1) from None
        except KeyboardInterrupt as e:
            stop_handled()  # whichever job it stopped, nothing stays pending for the next command
            note(str(e) or "interrupted")
            raise typer.Exit(128 + stop_signal()) from None
    return run


app.command(name="predict", short_help="Segment images of any size into class masks.")(_guarded(predict.predict))
app.command(name="train", short_help="Train a model (resumable).")(_guarded(train.train))
app.command(name="eval", short_help="Score a model on a labelled split (mIoU).")(_guarded(evaluate.evaluate))
app.command(name="vectorize", short_help="Polygons and areas of class masks.")(_guarded(vectorize.vectorize))
app.command(name="models", short_help="List architectures and shipped weights.")(_guarded(listing.models))


def command() -> typer.core.TyperGroup:
    """The click command of `app`, its arguments shown by their metavar alone (Typer would add a
    Python type such as `<list[str]>` to `INPUT` in `--help`)."""
    group = typer.main.get_command(app)
    for sub in group.commands.values():
        for param in sub.params:
            if isinstance(param, typer.core.TyperArgument) and param.metavar:
                param.display_type_rich = lambda ctx: None
    return group


def main() -> None:
    """Console-script entry: user mistakes become one `Error:` line and exit code 1; Ctrl-C (or a
    first SIGTERM) says what was kept and exits 130 (143)."""
    stop_on_terminate()
    try:
        command()(prog_name="bigseg")
    except BigsegError as e:
        error_line(e)
        sys.exit(1)
