"""`bigseg vectorize`: class masks (bigseg's or any single-band class raster) to polygons and areas."""
from __future__ import annotations

import json
import sys

import typer

from bigseg.cli import options as O
from bigseg.cli.render import error_line, note


def vectorize(
    inputs: list[str] = typer.Argument(..., metavar="MASK", help="Class masks: files, folders or globs.",
                                       show_default=False),
    out: str | None = typer.Option(None, "--out", "-o", metavar="PATH",
                                   help="Output folder (an existing one, or a path ending in /), or file for one "
                                        "mask. Default: beside each mask."),
    vector: str = typer.Option("gpkg", "--format", "-f", metavar="FORMAT", help="gpkg, geojson, fgb or shp."),
    areas: O.Areas = False,
    classes: O.VectorClasses = None,
    min_area: O.MinArea = 0.0,
    simplify: O.Simplify = 0.0,
    connectivity: O.Connectivity = 4,
    recursive: bool = typer.Option(False, "--recursive", "-r", help="Look for masks in subfolders."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Redo polygons that already exist."),
    quiet: O.Quiet = False,
    json_summary: bool = typer.Option(False, "--json", help="Print a machine-readable summary on stdout."),
) -> None:
    """Polygons of each class region of a mask (holes kept, regions whole whatever the mask's size), and areas."""
    from bigseg.errors import InputError
    from bigseg.io.kinds import WriteOptions
    from bigseg.run.vectorize import VectorOptions, find_masks, vectorize_all

    options = VectorOptions(vector, O.parse_names(classes) or None, min_area, simplify, connectivity)
    try:
        options.check()
    except InputError as e:  # the library's `vector` format is this command's --format
        raise InputError(e.reason, param="format" if e.param == "vector" else e.param) from None
    jobs, failed = find_masks(inputs, out, options, recursive)
    def said(kind: str, payload) -> None:
        if kind == "done" and not (quiet or json_summary):
            note(f"{payload.mask} -> {payload.output} ({payload.polygons} polygons, {payload.seconds:.1f} s)")
        elif kind == "note" and not quiet:
            note(f"note: {payload}")

    summary = vectorize_all(jobs, WriteOptions(areas=areas, polygons=options), overwrite, said)
    for failure in failed + summary.failed:
        error_line(failure.error)
    if json_summary:
        print(json.dumps({
            "done": [{"input": str(r.mask), "output": str(r.output), "polygons": r.polygons,
                      "seconds": round(r.seconds, 3), "areas": r.areas.to_dict(), "notes": r.notes,
                      **({"areas_csv": str(r.areas_csv)} if r.areas_csv else {})} for r in summary.done],
            "skipped": [{"input": str(j.input), "output": str(j.output)} for j in summary.skipped],
            "failed": [{"input": f.input, "error": f.error} for f in failed + summary.failed]}, indent=2))
    elif not quiet and len(jobs) + len(failed) > 1:
        print(f"{len(summary.done)} done, {len(summary.skipped)} skipped, {len(failed) + len(summary.failed)} failed",
              file=sys.stderr)
    if failed or summary.failed:
        raise typer.Exit(1)
