"""`bigseg predict`: options -> jobs -> the run package; progress and the summary on stderr/stdout."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import typer

from bigseg.cli import options as O
from bigseg.cli.render import TileProgress, failure_line, note, print_plans
from bigseg.crf.params import parse_crf
from bigseg.io.area import AreaOptions, parse_bbox
from bigseg.run.inputs import parse_output_grid, parse_resolution
from bigseg.io.bands import parse_bands, parse_value_range
from bigseg.io.kinds import check_kinds
from bigseg.io.outputs import WriteOptions
from bigseg.io.readers import ReadOptions
from bigseg.run.discover import prepare

DEFAULT_MODEL = "swiftnet-lite0-camvid"  # the best shipped street model on CamVid test (its card)


def predict(
    inputs: list[str] = typer.Argument(..., metavar="INPUT", help="Image files, folders or globs (one or more).", show_default=False),
    model: O.Model = DEFAULT_MODEL,
    out: Path | None = typer.Option(None, "--out", "-o", metavar="PATH",
                                       help="Output folder, or file for one input. Default: here."),
    recursive: bool = typer.Option(False, "--recursive", "-r", help="Look for images in subfolders."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Redo outputs that already exist."),
    tile: O.Tile = 1024,
    overlap: O.Overlap = None,
    batch_size: O.BatchSize = 4,
    device: O.Device = "auto",
    precision: O.Precision = "auto",
    bands: O.Bands = None,
    value_range: O.ValueRange = None,
    reader: str = typer.Option("auto", metavar="NAME", help="auto, gdal, tifffile or opencv."),
    bbox: str | None = typer.Option(None, "--bbox", metavar="MINX,MINY,MAXX,MAXY",
                                    help="Predict only this box (in the raster's CRS, or --bbox-crs)."),
    bbox_crs: str | None = typer.Option(None, "--bbox-crs", metavar="CRS", help="The CRS of --bbox, e.g. EPSG:4326."),
    resolution: str = typer.Option("model", "--resolution", metavar="model|native|METRES",
                                   help="Ground pixel size to predict at: the model's (inputs far from it "
                                        "are resampled, with a note), the input's own, or so many metres."),
    output_grid: str = typer.Option("input", "--output-grid", metavar="input|model",
                                    help="With --resolution resampling: write on the input's grid or the model's."),
    asset: str | None = typer.Option(None, "--asset", metavar="NAME",
                                     help="A STAC item input's asset (default: its visual one)."),
    aoi: str | None = typer.Option(None, "--aoi", metavar="FILE",
                                   help="Predict only inside these polygons (any vector file; outside: nodata)."),
    scales: O.Scales = "1",
    flip: O.Flip = False,
    rotate: O.Rotate = False,
    crf: O.Crf = None,
    crf_params: O.CrfParams = None,
    probs: bool = typer.Option(False, "--probs", help="Also write per-class probabilities (uint8, p*255)."),
    overlay: bool = typer.Option(False, "--overlay", help="Also write a colour preview over the image."),
    cog: bool = typer.Option(False, "--cog", help="Write cloud-optimised GeoTIFFs with overviews."),
    compile_model: bool = typer.Option(False, "--compile", help="torch.compile the model (slow start, faster GPU tiles)."),
    threads: O.Threads = None,
    engine: O.Engine = "auto",
    io_threads: int | None = typer.Option(None, "--io-threads", metavar="N",
                                             help="GDAL threads decoding input and compressing output blocks. "
                                                  "Default: 1 on the CPU, up to 8 with a GPU."),
    seams: bool = typer.Option(False, "--seams", help="Report how often neighbouring tiles disagree in their overlaps."),
    vector: str | None = typer.Option(
        None, "--vector", metavar="FORMAT", help="Also write the mask's polygons as NAME.polygons.gpkg (gpkg, "
        "geojson, fgb or shp), with class, area, perimeter and source."),
    areas: O.Areas = False,
    also: str | None = typer.Option(None, "--also", metavar="KIND,...",
                                    help="Also write these registered output kinds (probs, overlay, polygons, "
                                         "areas, or one a module adds: docs/development.md)."),
    vector_classes: O.VectorClasses = None,
    min_area: O.MinArea = 0.0,
    simplify: O.Simplify = 0.0,
    connectivity: O.Connectivity = 4,
    quiet: O.Quiet = False,
    json_summary: bool = typer.Option(False, "--json", help="Print a machine-readable summary on stdout."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the plan (tiles, outputs, peak memory) and stop."),
    estimate: bool = typer.Option(False, "--estimate", help="With --dry-run: time a short warm-up to estimate the run time."),
) -> None:
    """Segment images of any size into class masks, tile by tile, in bounded memory."""
    area = AreaOptions(parse_bbox(bbox), bbox_crs, aoi)
    read = ReadOptions(parse_bands(bands), parse_value_range(value_range), reader, area if area.given else None, asset,
                       parse_resolution(resolution), parse_output_grid(output_grid))
    write = WriteOptions(probs, overlay, cog, seams, areas,
                         _vector_options(vector, vector_classes, min_area, simplify, connectivity),
                         tuple(O.parse_names(also) or ()))
    check_kinds(write.extra)
    scale_factors, crf_settings = O.parse_scales(scales), parse_crf(crf, crf_params)
    O.check_threads(threads)
    rank = int(os.environ.get("RANK", "0"))  # under torchrun, rank 0 speaks for everyone
    quiet = quiet or rank > 0
    found = prepare(inputs, out, recursive, asset)  # user mistakes surface before torch loads
    for skipped in found.ignored:
        if not quiet:
            note(f"note: {skipped.error}")
    if not found.jobs:
        _nothing_to_do(found, json_summary)
        return

    from bigseg.infer.settings import Settings
    from bigseg.infer.start import open_predictor
    from bigseg.run.batch import run_predict
    from bigseg.run.file_job import JobOptions
    from bigseg.runtime import keep_freed_memory

    if os.environ.get("BIGSEG_KEEP_FREED_MEMORY") == "1":  # faster with torch, but memory grows with width
        keep_freed_memory()
    progress = TileProgress(quiet or json_summary)

    single = not dry_run and rank == 0 and os.environ.get("WORLD_SIZE", "1") == "1"
    if not single:  # under torchrun, `auto` and `cuda` mean this process's GPU
        from bigseg import distributed

        device = distributed.device_for_rank(device, distributed.rank_from_env())
    settings = Settings(device, precision, tile, overlap, batch_size, scale_factors, flip, crf_settings, compile_model,
                        engine, threads, rotate)
    # a model whose export is compiled and cached predicts without torch (a warm start in a second)
    predictor = open_predictor(model, settings, progress.note, warm=single, before_torch=lambda: _threads(threads))
    options = JobOptions(read, write, float(os.environ.get("BIGSEG_JOURNAL_SECONDS", "5")), io_threads)
    if dry_run:
        _dry_run(predictor, inputs, out, recursive, options, estimate, json_summary, rank)
        return
    with progress:
        summary = run_predict(predictor, found.jobs, found.failed, found.ignored, overwrite=overwrite,
                              options=options, on_event=_events(progress, tile))
    for failure in summary.failed:
        failure_line(failure)
    _report(summary, quiet, json_summary and rank == 0)
    if not summary.ok:
        raise typer.Exit(1)


def _threads(threads: int | None) -> None:
    from bigseg.runtime import set_threads

    set_threads(threads)


def _vector_options(vector, vector_classes, min_area, simplify, connectivity):
    """--vector and its settings, checked before any work; None without --vector."""
    if vector is None:
        return None
    from bigseg.vector.features import VectorOptions

    polygons = VectorOptions(vector, O.parse_names(vector_classes) or None, min_area, simplify, connectivity)
    polygons.check()
    return polygons


def _nothing_to_do(found, as_json: bool) -> None:
    """No input left to segment: the failures said, exit 1; only bigseg's own outputs named: fine."""
    for failure in found.failed:
        failure_line(failure)
    if found.failed or not found.ignored:
        raise typer.Exit(1)
    if as_json:
        print(json.dumps({"done": [], "skipped": [], "failed": [],
                          "ignored": [{"input": f.input, "why": f.error} for f in found.ignored]}, indent=2))


def _dry_run(predictor, inputs, out, recursive, options, estimate: bool, as_json: bool, rank: int) -> None:
    from bigseg.run.plan import dry_run

    if rank > 0:  # one plan is enough under torchrun
        return
    plans, failed = dry_run(predictor, inputs, out, recursive=recursive, options=options, estimate=estimate)
    for plan in plans:  # the library says where the overlap came from; here that is an option
        plan.overlap_from = "--overlap" if plan.overlap_from == "given" else plan.overlap_from
    print_plans(plans, as_json)
    for failure in failed:
        failure_line(failure)
    if failed:
        raise typer.Exit(1)


def _events(progress: TileProgress, tile: int):
    """The job loop's events as progress lines."""
    def on_event(kind: str, payload) -> None:
        if kind == "start":
            progress.start(payload.input.name, tile * tile)
        elif kind == "tile":
            progress.tile(*payload)
        elif kind == "note":
            progress.note(payload)
        elif kind == "done":
            progress.finish()
            for n in payload.notes:  # those said when they happened are not repeated
                warning = n.startswith("warning: ")
                progress.note(f"warning: {payload.input.name}: {n[9:]}" if warning else f"{payload.input.name}: {n}", n)
            if payload.seams is not None:
                s = payload.seams
                progress.line(f"seams: {payload.input.name}: neighbouring tiles disagree on {100 * s['rate']:.3f}% "
                              f"of {s['compared']} overlap pixels")
            progress.line(f"{payload.input} -> {payload.output} ({payload.width}x{payload.height}, "
                          f"{payload.tiles} tiles, {payload.seconds:.1f} s, "
                          f"{payload.megapixels / max(payload.seconds, 1e-9):.2f} MP/s)")
        elif kind == "skip":
            progress.line(f"{payload.input}: {payload.output} exists, skipped (--overwrite to redo)")
        elif kind == "fail":
            progress.finish()
            failure_line(payload)
    return on_event


def _report(summary, quiet: bool, as_json: bool) -> None:
    if as_json:
        print(json.dumps({
            "done": [{"input": str(r.input), "output": str(r.output), "extras": [str(p) for p in r.extras],
                      "width": r.width, "height": r.height, "tiles": r.tiles, "seconds": round(r.seconds, 3),
                      "notes": r.notes, **({"seams": r.seams} if r.seams is not None else {}),
                      **({"areas": r.areas.to_dict()} if r.areas is not None else {}),
                      **({"gpu_peak_mib": round(r.gpu_peak_mib, 1)} if r.gpu_peak_mib is not None else {})}
                     for r in summary.done],
            "skipped": [{"input": str(j.input), "output": str(j.output)} for j in summary.skipped],
            "failed": [{"input": f.input, "error": f.error} for f in summary.failed],
            "ignored": [{"input": f.input, "why": f.error} for f in summary.ignored],
        }, indent=2))
        return
    total = len(summary.done) + len(summary.skipped) + len(summary.failed) + len(summary.ignored)
    if total > 1 and not quiet:
        print(f"{len(summary.done)} done, {len(summary.skipped)} skipped, {len(summary.failed)} failed"
              + (f", {len(summary.ignored)} of bigseg's own outputs passed over" if summary.ignored else ""),
              file=sys.stderr)
