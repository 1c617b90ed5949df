"""A class mask to polygons and areas: `bigseg vectorize MASK` and `predict --vector`.

The mask is read strip by strip (full width) and polygonised in bounded memory
(`bigseg.vector.polygons`): one polygon (8-connectivity: a multipolygon whose parts meet at corners) per
connected region of a class, holes kept, nodata never a region, regions cut by strips joined.
Each polygon carries its class value and name, its area and perimeter (square metres and metres,
geodesic on the ellipsoid for a geographic CRS; pixels without a CRS) and the source file, in the
mask's CRS. `--min-area` drops regions smaller than so many square metres (pixels without a CRS); `--simplify` simplifies each polygon on its own
(Douglas-Peucker, topology kept within the polygon): neighbours' shared edges may then part by up
to the tolerance, since a streaming run never holds the whole coverage (0, the default, keeps them
exact). The per-class areas come from the same read.
"""
from __future__ import annotations

import os
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from bigseg.vector.areas import AreaStats, Ground
from bigseg.atomic import write_text
from bigseg.errors import InputError, RasterFormatError, first_line
from bigseg.io.gdal import gdal_env
from bigseg.io.categories import class_names
from bigseg.vector.layers import Field, VectorWriter, vector_format
from bigseg.vector.polygons import StreamingPolygons

STRIP_PIXELS = 1 << 22  # pixels of one strip (at least 64 rows): what bounds the memory


@dataclass(frozen=True)
class VectorOptions:
    """`format` (gpkg, geojson, fgb, shp); `classes` to keep (values or names; None: all);
    `min_area` (square metres, geodesic in a geographic CRS; pixels without a CRS); `simplify`
    tolerance (map units);
    `connectivity` 4 or 8; `areas`: also write NAME.areas.csv."""

    format: str = "gpkg"
    classes: tuple[str, ...] | None = None
    min_area: float = 0.0
    simplify: float = 0.0
    connectivity: int = 4
    areas: bool = False

    def check(self) -> None:
        vector_format(self.format)
        if self.min_area < 0:
            raise InputError(f"must be 0 or more, got {self.min_area}", param="min_area")
        if self.simplify < 0:
            raise InputError(f"must be 0 or more, got {self.simplify}", param="simplify")
        if self.connectivity not in (4, 8):
            raise InputError(f"must be 4 or 8, got {self.connectivity}", param="connectivity")


@dataclass
class VectorResult:
    mask: Path
    output: Path
    polygons: int
    seconds: float
    areas: AreaStats
    areas_csv: Path | None = None
    notes: list[str] = field(default_factory=list)


def vector_paths(mask: Path, options: VectorOptions, folder: Path | None = None) -> tuple[Path, Path]:
    """`city.mask.tif` -> (`city.polygons.gpkg`, `city.areas.csv`), beside it or in `folder`."""
    _, suffix = vector_format(options.format)
    name = mask.name
    for ending in (".mask" + mask.suffix, mask.suffix):
        if name.endswith(ending):
            name = name[: -len(ending)]
            break
    where = folder or mask.parent
    return where / f"{name}.polygons{suffix}", where / f"{name}.areas.csv"


def vectorize_file(mask: Path, dst: Path, options: VectorOptions = VectorOptions(), areas_csv: Path | None = None,
                   on_event: Callable[[str, object], None] | None = None) -> VectorResult:
    """Polygonise the class raster `mask` into `dst` (and with `areas_csv`, its per-class areas)."""
    options.check()
    start = time.perf_counter()
    say = on_event or (lambda kind, payload: None)
    with gdal_env(), _open(mask) as ds:
        ground = Ground(ds.crs, ds.transform if ds.crs is not None else None, ds.width, ds.height)
        if not ground.georeferenced and vector_format(dst.suffix)[0] == "GeoJSON":
            raise InputError(f"{mask.name} has no georeferencing: its polygons would be in pixel coordinates, "
                             f"which every GeoJSON reader takes for longitudes and latitudes (GeoJSON has no "
                             f"way to say 'no CRS'); write gpkg or fgb, which record none")
        notes = [] if ground.georeferenced else [
            f"{mask.name} has no georeferencing: polygons in pixel coordinates, areas in pixels"]
        names = class_names(mask, ds.tags()) or []
        if not names:
            names, table = classes_beside(mask)
            if table is not None:
                notes.append(f"class names from {table}")
        named = len(names)
        names = names + [str(v) for v in range(named, _class_count(ds, names))]
        keep = _keep(options.classes, names)
        stats = AreaStats(names, ground, named)
        polygons = StreamingPolygons(ds.width, ds.height, options.connectivity, keep, ds.nodata if ds.nodata is not None
                                     else None)
        dst.parent.mkdir(parents=True, exist_ok=True)
        writer = VectorWriter(dst, ds.crs, _fields(ground), "Polygon" if options.connectivity == 4 else "MultiPolygon",
                              "classes")
        try:
            rows = max(64, min(ds.height, STRIP_PIXELS // max(ds.width, 1)))
            for top in range(0, ds.height, rows):
                h = min(rows, ds.height - top)
                strip = _read(ds, mask, top, h)
                stats.add(top, strip, _valid(ds, strip))
                for value, geometry in polygons.add(strip, top):
                    _write(writer, value, geometry, names, ground, options, mask, ds.transform)
                say("rows", (top + h, ds.height))
            for value, geometry in polygons.finish():
                _write(writer, value, geometry, names, ground, options, mask, ds.transform)
            written = writer.commit()
        except BaseException:
            writer.abort()
            raise
    if areas_csv is not None:
        write_text(areas_csv, stats.csv())
    return VectorResult(mask, written, writer.count, time.perf_counter() - start, stats, areas_csv, notes)


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


def _valid(ds, strip: np.ndarray) -> np.ndarray:
    return np.ones(strip.shape, bool) if ds.nodata is None else strip != ds.nodata


def _class_count(ds, names: list[str]) -> int:
    """How many class values there may be: the names', else up to the largest the dtype holds
    below the nodata value (uint8: 255 classes at most)."""
    if names:
        return len(names)
    return 255 if np.dtype(ds.dtypes[0]).itemsize == 1 else 256


def _keep(classes: tuple[str, ...] | None, names: list[str]) -> set[int] | None:
    if not classes:
        return None
    keep = set()
    for c in classes:
        if c.isdigit():
            keep.add(int(c))
        elif c in names:
            keep.add(names.index(c))
        else:
            raise InputError(f"names no class {c!r} (the mask's classes: {', '.join(names[:12])})", param="classes")
    return keep


def _fields(ground: Ground) -> list[Field]:
    unit = ("m2", "m") if ground.georeferenced else ("px", "px")
    return [Field("class", int), Field("class_name", str), Field(f"area_{unit[0]}", float),
            Field(f"perimeter_{unit[1]}", float), Field("source", str)]


def _write(writer: VectorWriter, value: int, geometry, names: list[str], ground: Ground, options: VectorOptions,
           mask: Path, transform) -> None:
    """One region: in map coordinates, kept if large enough, simplified, measured, written."""
    import shapely
    from shapely import affinity

    if ground.georeferenced:
        t = transform
        geometry = affinity.affine_transform(geometry, [t.a, t.b, t.d, t.e, t.c, t.f])
    area, perimeter = ground.measure(geometry)
    if area < options.min_area:
        return
    if options.simplify:
        geometry = shapely.simplify(geometry, options.simplify, preserve_topology=True)
        area, perimeter = ground.measure(geometry)
    name = names[value] if value < len(names) else str(value)
    writer.add(geometry, [int(value), name, round(float(area), 4), round(float(perimeter), 4), str(mask)])



def mask_areas(mask: Path) -> AreaStats:
    """The per-class areas of a finished mask, read strip by strip."""
    with gdal_env(), _open(mask) as ds:
        names = class_names(mask, ds.tags()) or []
        named = len(names)
        names = names + [str(v) for v in range(named, _class_count(ds, names))]
        stats = AreaStats(names, Ground(ds.crs, ds.transform if ds.crs is not None else None, ds.width, ds.height),
                          named)
        rows = max(64, min(ds.height, STRIP_PIXELS // max(ds.width, 1)))
        for top in range(0, ds.height, rows):
            strip = _read(ds, mask, top, min(rows, ds.height - top))
            stats.add(top, strip, _valid(ds, strip))
    return stats


@dataclass
class VectorSummary:
    done: list[VectorResult] = field(default_factory=list)
    skipped: list = field(default_factory=list)
    failed: list = field(default_factory=list)


def find_masks(inputs: list[str], out: Path | str | None, options: VectorOptions,
               recursive: bool) -> tuple[list, list]:
    """(jobs: mask -> polygons file, failures) for files, folders and globs of class masks. A
    folder gives its bigseg masks (`*.mask.*`) when it has any, else every raster in it. `out`: a
    folder (an existing one, or any path written with a trailing slash) or, for one mask, a file."""
    from bigseg.run.discover import Failure, Job, expand_inputs

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


def vectorize_all(jobs: list, options: VectorOptions, overwrite: bool = False,
                  on_done: Callable[[VectorResult], None] | None = None,
                  on_note: Callable[[str], None] | None = None) -> VectorSummary:
    """Each job's polygons (and areas table); a finished one is skipped, a failed one alone."""
    from bigseg.errors import describe_failure
    from bigseg.run.discover import Failure

    summary = VectorSummary()
    for job in jobs:
        csv = vector_paths(job.input, options, job.output.parent)[1] if options.areas else None
        if job.output.exists() and (csv is None or csv.exists()) and not overwrite:
            summary.skipped.append(job)
            continue
        try:
            result = vectorize_file(job.input, job.output, options, csv)
        except Exception as e:  # each mask fails alone, in one line
            text = describe_failure(e)
            summary.failed.append(Failure(str(job.input), text if job.input.name in text else f"{job.input}: {text}"))
            continue
        summary.done.append(result)
        for n in result.notes:
            if on_note is not None:
                on_note(n)
        if on_done is not None:
            on_done(result)
    return summary
