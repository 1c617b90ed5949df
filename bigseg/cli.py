"""The `bigseg` command: parse options, call the library, print. Nothing else lives here."""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import List, Optional

import typer

from bigseg import __version__
from bigseg.errors import BigsegError

app = typer.Typer(name="bigseg", help="Semantic segmentation of very large images.",
                  no_args_is_help=True, pretty_exceptions_enable=False)

DEFAULT_MODEL = "ladder-dn121"


def _version(value: bool) -> None:
    if value:
        print(f"bigseg {__version__}")
        raise typer.Exit()


@app.callback()
def root(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                      help="Print the version and exit.")) -> None:
    """Segment megapixel photos to gigapixel orthomosaics; train and evaluate the models."""


@app.command()
def models() -> None:
    """List the registered architectures: paper, parameters, shipped weights."""
    from rich.table import Table

    from bigseg.console import out
    from bigseg.models.complexity import architecture_rows

    table = Table(title="bigseg architectures (parameters at 19 classes, inference heads only)")
    for col in ("name", "paper", "params", "authors' config", "weights", "note"):
        table.add_column(col)
    for row in architecture_rows():
        table.add_row(row["name"], row["paper"], f"{row['params'] / 1e6:.2f} M",
                      f"{row['reference_params'] / 1e6:.2f} M", "shipped" if row["shipped"] else "-",
                      row["note"])
    out.print(table)


@app.command()
def predict(
    inputs: List[str] = typer.Argument(..., help="Image files, folders or globs."),
    model: str = typer.Option(DEFAULT_MODEL, "--model", "-m", help="Shipped model name or a .pt checkpoint."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Output folder, or file for one input. Default: here."),
    recursive: bool = typer.Option(False, "--recursive", "-r", help="Look for images in subfolders."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Redo outputs that already exist."),
    tile: int = typer.Option(1024, help="Tile side in pixels."),
    overlap: Optional[int] = typer.Option(None, help="Tile overlap in pixels. Default: tile/4."),
    batch_size: int = typer.Option(4, "--batch-size", "-b", help="Tiles per forward pass."),
    device: str = typer.Option("auto", help="auto, cpu, cuda or cuda:N."),
    precision: str = typer.Option("auto", help="auto, fp32, bf16 or fp16 (fp16 on GPU only)."),
    bands: Optional[str] = typer.Option(None, help="1-based bands to use, in order, e.g. 1,2,3."),
    value_range: Optional[str] = typer.Option(None, help="LOW,HIGH mapped to 0..255 for non-8-bit input."),
    reader: str = typer.Option("auto", help="auto, gdal, tifffile or opencv."),
    probs: bool = typer.Option(False, help="Also write per-class probabilities (uint8, p*255)."),
    overlay: bool = typer.Option(False, help="Also write a colour preview over the image."),
    cog: bool = typer.Option(False, help="Write cloud-optimised GeoTIFFs with overviews."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Print nothing but errors."),
    json_summary: bool = typer.Option(False, "--json", help="Print a machine-readable summary on stdout."),
) -> None:
    """Segment images of any size into class masks, tile by tile, in bounded memory."""
    from bigseg.checkpoint import resolve_model
    from bigseg.console import TileProgress
    from bigseg.inference import ReadOptions, Segmenter, WriteOptions
    from bigseg.io.bands import parse_bands, parse_value_range
    from bigseg.jobs import run_predict

    read = ReadOptions(parse_bands(bands), parse_value_range(value_range), reader)
    segmenter = Segmenter(resolve_model(model), device, precision, tile, overlap, batch_size)
    progress = TileProgress(quiet or json_summary)

    def on_event(kind: str, payload) -> None:
        if kind == "start":
            progress.start(payload.input.name, 0, tile * tile)
        elif kind == "tile":
            progress.tile()
        elif kind == "done":
            progress.finish()
            for n in payload.notes:
                progress.line(f"note: {payload.input.name}: {n}")
            progress.line(f"{payload.input} -> {payload.output} ({payload.width}x{payload.height}, "
                          f"{payload.tiles} tiles, {payload.seconds:.1f} s, "
                          f"{payload.megapixels / max(payload.seconds, 1e-9):.2f} MP/s)")
        elif kind == "skip":
            progress.line(f"{payload.input}: {payload.output} exists, skipped (--overwrite to redo)")
        elif kind == "fail":
            progress.finish()
            _error_line(payload.error)

    with progress:
        summary = run_predict(segmenter, inputs, out, recursive=recursive, overwrite=overwrite,
                              read=read, write=WriteOptions(probs, overlay, cog), on_event=on_event)
    for failure in summary.failed:
        _error_line(failure.error)
    _report(summary, quiet, json_summary)
    if not summary.ok:
        raise typer.Exit(1)


def _report(summary, quiet: bool, as_json: bool) -> None:
    if as_json:
        print(json.dumps({
            "done": [{"input": str(r.input), "output": str(r.output), "extras": [str(p) for p in r.extras],
                      "width": r.width, "height": r.height, "tiles": r.tiles, "seconds": round(r.seconds, 3)}
                     for r in summary.done],
            "skipped": [{"input": str(j.input), "output": str(j.output)} for j in summary.skipped],
            "failed": [{"input": f.input, "error": f.error} for f in summary.failed],
        }, indent=2))
        return
    total = len(summary.done) + len(summary.skipped) + len(summary.failed)
    if total > 1 and not quiet:
        print(f"{len(summary.done)} done, {len(summary.skipped)} skipped, {len(summary.failed)} failed",
              file=sys.stderr)


_printed: set[str] = set()


def _error_line(message: str) -> None:
    from bigseg.console import error

    if message not in _printed:
        _printed.add(message)
        error(message)


def main() -> None:
    """Console-script entry: user mistakes become one `Error:` line and exit code 1."""
    try:
        app(prog_name="bigseg")
    except BigsegError as e:
        _error_line(str(e))
        sys.exit(1)
    except KeyboardInterrupt:
        print("interrupted; unfinished outputs were removed", file=sys.stderr)
        sys.exit(130)
