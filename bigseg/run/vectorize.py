"""A class mask to polygons and areas: `bigseg vectorize MASK`, and the files `bigseg predict` makes
from a mask an earlier run left (`from_mask`).

The mask is read strip by strip (full width) in bounded memory and its rows go to the same outputs
`predict --vector --areas` feeds as it writes a mask (`bigseg.io.kinds`): polygons
(`bigseg.vector.features`: one polygon, or with 8-connectivity a multipolygon whose parts meet at
corners, per connected region of a class, holes kept, nodata never a region, regions cut by strips
joined) and the per-class areas from the same read.
"""
from __future__ import annotations

import os
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from bigseg.errors import InputError, RasterFormatError, first_line
from bigseg.io.categories import class_names
from bigseg.io.gdal import gdal_env
from bigseg.io.kinds import AreasOutput, Output, PolygonsOutput, WriteOptions, sibling
from bigseg.run.discover import Failure, Job, expand_inputs
from bigseg.run.file_job import PredictResult
from bigseg.run.jobs import Events, Summary, run_jobs
from bigseg.tiling.geometry import Georef
from bigseg.vector.areas import AreaStats, Ground
from bigseg.vector.features import PolygonFeatures, VectorOptions, strip_rows
from bigseg.vector.layers import vector_format

__all__ = ["VectorOptions", "find_masks", "from_mask", "vector_paths", "vectorize_all", "vectorize_file"]


@dataclass
class VectorResult:
    mask: Path
    output: Path | None  # the polygons (None: areas only)
    polygons: int
    seconds: float
    areas: AreaStats
    areas_csv: Path | None = None
    notes: list[str] = field(default_factory=list)


def vector_paths(mask: Path, options: VectorOptions, folder: Path | None = None) -> tuple[Path, Path]:
    """`city.mask.tif` -> (`city.polygons.gpkg`, `city.areas.csv`), beside it or in `folder`."""
    where = folder or mask.parent
    return (where / sibling(mask, "polygons", vector_format(options.format)[1]).name,
            where / sibling(mask, "areas", ".csv").name)


def vectorize_file(mask: Path, dst: Path | None, options: VectorOptions = VectorOptions(),
                   areas_csv: Path | None = None, on_event: Events | None = None) -> VectorResult:
    """Polygonise the class raster `mask` into `dst` (None: no polygons) and with `areas_csv`
    write its per-class areas; the areas are counted either way."""
    options.check()
    start = time.perf_counter()
    say = on_event or (lambda kind, payload: None)
    with gdal_env(), _open(mask) as ds:
        ground = Ground(Georef.of(ds), ds.width, ds.height)
        notes = [] if ground.georeferenced else [
            f"{mask.name} has no georeferencing: polygons in pixel coordinates, areas in pixels"]
        names, named = _names(mask, ds, notes)
        areas = AreasOutput(areas_csv, AreaStats(names, ground, named), ds.nodata)
        outputs: list[Output] = [areas]
        if dst is not None:
            outputs.insert(0, PolygonsOutput(PolygonFeatures(dst, ground, names, options, str(mask), ds.nodata)))
        try:
            rows = strip_rows(ds.width, ds.height)
            for top in range(0, ds.height, rows):
                h = min(rows, ds.height - top)
                strip = _read(ds, mask, top, h)
                for output in outputs:
                    output.rows(top, strip)
                say("rows", (top + h, ds.height))
            written = outputs[0].commit() if dst is not None else None
        except BaseException:
            outputs[0].abort()
            raise
    if areas_csv is not None:
        areas.commit()
    count = outputs[0].features.count if dst is not None else 0
    return VectorResult(mask, written, count, time.perf_counter() - start, areas.stats, areas_csv, notes)


def from_mask(src: Path, mask: Path, write: WriteOptions) -> PredictResult:
    """The polygons and areas table of a mask an earlier run wrote (the image is not segmented again)."""
    polygons, csv = vector_paths(mask, write.polygons or VectorOptions())
    done = vectorize_file(mask, polygons if write.polygons is not None else None, write.polygons or VectorOptions(),
                          csv if write.areas else None)
    width, height = done.areas.ground.width, done.areas.ground.height  # the mask is not opened again
    notes = ["the mask was there: polygons and areas from it"] + done.notes
    extras = [p for p in (done.output, done.areas_csv) if p is not None]
    return PredictResult(src, mask, width, height, 0, done.seconds, extras, notes,
                         areas=done.areas if write.areas else None)


def _names(mask: Path, ds, notes: list[str]) -> tuple[list[str], int]:
    """Class names by value (from the mask, else a classes.csv beside it, else numbers up to what
    the dtype holds) and how many of them are named."""
    names = class_names(mask, ds.tags()) or []
    if not names:
        names, table = classes_beside(mask)
        if table is not None:
            notes.append(f"class names from {table}")
    named = len(names)
    return names + [str(v) for v in range(named, _class_count(ds, names))], named


def classes_beside(mask: Path) -> tuple[list[str], Path | None]:
    """Class names by value from a `classes.csv` beside the mask or one folder up (where a raster
    scene data set keeps it beside `labels/`, as `bigseg train` reads it); values it does not
    list keep their numbers."""
    from bigseg.errors import DatasetError
    from bigseg.train.data.classes import read_classes_csv

    for folder in (mask.parent, mask.parent.parent):
        path = folder / "classes.csv"
        if path.is_file():
            try:
                table = read_classes_csv(path)
            except DatasetError:
                return [], None  # not a class table bigseg can read: numbers, as without one
            by_value = dict(zip(table.codes, table.names))
            top = max(v for v in by_value if v >= 0)
            return [by_value.get(v, str(v)) for v in range(top + 1)], path
    return [], None


def _open(mask: Path):
    import rasterio

    if not mask.is_file():
        raise InputError(f"mask not found: {mask}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # a mask without georeferencing is said as a note
            ds = rasterio.open(mask)
    except rasterio.errors.RasterioIOError as e:
        raise RasterFormatError(f"{mask}: not a readable raster ({first_line(e)})") from None
    if ds.count != 1 or np.dtype(ds.dtypes[0]).kind not in "ui":
        ds.close()
        raise InputError(f"{mask}: a class mask has one band of integer class values; this has {ds.count} band(s) "
                         f"of {ds.dtypes[0]}")
    return ds


def _read(ds, mask: Path, top: int, h: int) -> np.ndarray:
    from rasterio.windows import Window

    try:
        return ds.read(1, window=Window(0, top, ds.width, h))
    except Exception as e:  # GDAL decode errors surface as several rasterio types
        raise RasterFormatError(f"{mask}: cannot decode rows {top}..{top + h} ({first_line(e)})") from None


def _class_count(ds, names: list[str]) -> int:
    """How many class values there may be: the names', else up to the largest the dtype holds
    below the nodata value (uint8: 255 classes at most)."""
    if names:
        return len(names)
    return 255 if np.dtype(ds.dtypes[0]).itemsize == 1 else 256


def find_masks(inputs: list[str], out: Path | str | None, options: VectorOptions,
               recursive: bool) -> tuple[list, list]:
    """(jobs: mask -> polygons file, failures) for files, folders and globs of class masks. A
    folder gives its bigseg masks (`*.mask.*`) when it has any, else every raster in it. `out`: a
    folder (an existing one, or any path written with a trailing slash) or, for one mask, a file."""
    found, failed, ignored = expand_inputs(inputs, recursive)
    masks = [p for p, _ in found] + [Path(f.input) for f in ignored if ".mask." in Path(f.input).name]
    by_folder: dict[Path, list[Path]] = {}
    for m in masks:
        by_folder.setdefault(m.parent, []).append(m)
    chosen = []
    for folder, files in by_folder.items():
        ours = [m for m in files if ".mask." in m.name]
        chosen += ours if ours and len(ours) < len(files) and not _named_one_by_one(inputs, files) else files
    folder = out is not None and (str(out).endswith(("/", os.sep)) or Path(out).is_dir())
    out = Path(out) if out is not None else None
    if out is not None and out.suffix and len(chosen) == 1 and not folder:
        try:
            vector_format(out.suffix)
        except InputError:
            raise InputError(f"{out}: a polygons file ends in .gpkg, .geojson, .fgb or .shp; to write into a "
                             f"folder, name an existing one or end the path with /", param="out") from None
        return [Job(chosen[0], out)], failed
    jobs = [Job(m, vector_paths(m, options, out)[0]) for m in sorted(set(chosen))]
    return jobs, failed + ([] if jobs or failed else [Failure(", ".join(inputs), "no class mask found")])


def _named_one_by_one(inputs: list[str], files: list[Path]) -> bool:
    return all(str(f) in inputs or f.name in inputs for f in files)


def vectorize_all(jobs: list[Job], write: WriteOptions, overwrite: bool = False,
                  on_event: Events = lambda kind, payload: None) -> Summary:
    """Each job's polygons (with `write.polygons`) and, with `write.areas`, areas table, in the job
    loop of `bigseg.run.jobs` (its events; a finished job is skipped, a failed one fails alone)."""
    options = write.polygons or VectorOptions()
    csv = lambda job: vector_paths(job.input, options, job.output.parent)[1] if write.areas else None

    def one(job: Job, say: Events) -> VectorResult:
        result = vectorize_file(job.input, job.output, options, csv(job))
        for n in result.notes:
            say("note", n)
        return result

    finished = lambda job: job.output.exists() and (csv(job) is None or csv(job).exists())
    return run_jobs(jobs, one, overwrite, on_event, finished=finished)
