"""The kinds of file a predict job writes, registered in one place: the mask, and beside it the
probabilities, the overlay preview, the polygons and the areas table. Each kind (`OutputKind`)
says when a job wants it, how it is named from the mask's name, what a dry run reports of it and
how it is opened as an `Output`. A new output format is one module that calls `register_output`.

An `Output` is one file of one job. It hears the finished rectangles of the prediction (`write`,
`write_nodata`) or, with `takes_rows`, the mask's finished full-width rows from top to bottom
(`rows`: what polygons and running totals need), and is committed (renamed into place) or aborted
with the others (`bigseg.io.outputs.OutputSet`).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from bigseg.atomic import write_text
from bigseg.errors import InputError
from bigseg.io.writers import GeoTiffWriter, OverlayWriter, PngWriter, Writer, write_class_styles
from bigseg.palette import NODATA
from bigseg.tiling.geometry import Georef, Window
from bigseg.vector.areas import AreaStats, Ground
from bigseg.vector.features import PolygonFeatures, VectorOptions
from bigseg.vector.layers import vector_format

BIGTIFF_BYTES = 4e9 / 1.1  # GDAL's BIGTIFF=IF_SAFER threshold
OUTPUT_TAG = "bigseg_output"  # a GeoTIFF tag on every mask and probabilities file bigseg writes


@dataclass(frozen=True)
class WriteOptions:
    """Which files a job writes beside its mask, and how: `probs`, `overlay`, `areas` (NAME.areas.csv),
    `polygons` (NAME.polygons.gpkg with these settings; None: none), `extra`: further registered
    kinds by name; `cog` GeoTIFFs; `seams`: report how often neighbouring tiles disagree in their
    overlaps (a mask tag)."""

    probs: bool = False
    overlay: bool = False
    cog: bool = False
    seams: bool = False
    areas: bool = False
    polygons: VectorOptions | None = None
    extra: tuple[str, ...] = ()

    def shaping(self) -> dict[str, bool]:
        """What shapes the mask's, probabilities' and overlay's bytes (a resume fingerprint's part):
        polygons and areas are made from the rows of the mask, so changing them resumes as well."""
        return {"probs": self.probs, "overlay": self.overlay, "cog": self.cog, "seams": self.seams}


@dataclass(frozen=True)
class Target:
    """What every file of one job is made from: the mask's path `dst` (every other name is made
    from it), the input's `kind` ("raster": GeoTIFF outputs; "image": PNG where `dst` is .png), size,
    georeference, the model's classes and palette, and a resumed job's rows already on disk."""

    dst: Path
    kind: str
    width: int
    height: int
    georef: Georef | None
    classes: Sequence[str]
    palette: Sequence[Sequence[int]]
    write: WriteOptions
    resume_rows: int = 0

    @property
    def png(self) -> bool:
        return writes_png(self.kind, self.dst)

    def sibling(self, tag: str, suffix: str) -> Path:
        return sibling(self.dst, tag, suffix)

    def ground(self) -> Ground:
        return Ground(self.georef, self.width, self.height)


def writes_png(kind: str, dst: Path) -> bool:
    """PNG for image inputs (PNG/JPEG) written to a .png name; GeoTIFF for everything else."""
    return kind == "image" and dst.suffix.lower() == ".png"


def sibling(path: Path, tag: str, suffix: str) -> Path:
    """`city.mask.tif` -> `city.probs.tif`; `out.tif` -> `out.probs.tif`."""
    stem = path.name[: -len(".mask" + path.suffix)] if path.name.endswith(".mask" + path.suffix) else path.stem
    return path.with_name(f"{stem}.{tag}{suffix}")


class Output:
    """One file of a job; every hook is a no-op unless the kind needs it."""

    takes_rows = False  # hears the mask's finished rows (`rows`)
    journaled: GeoTiffWriter | None = None  # a GeoTIFF whose finished block rows outlive an interruption

    def write(self, window: Window, labels: np.ndarray, probs: np.ndarray | None, valid: np.ndarray | None) -> None:
        """A finished rectangle: class labels (NODATA where invalid), probabilities if computed."""

    def write_nodata(self, window: Window) -> None:
        """A finished rectangle without a single valid pixel."""

    def add_image(self, window: Window, data: np.ndarray) -> None:
        """The input's pixels of a rectangle as the model reads them."""

    def image_rows(self, window: Window) -> Sequence[int]:
        """The rows of `window` whose input pixels this output samples (`add_image`)."""
        return ()

    def rows(self, top: int, labels: np.ndarray) -> None:
        """The mask's full-width rows from `top`, in order (with `takes_rows`)."""

    def replay(self, window: Window, labels: np.ndarray, read_image: Callable[[Window], np.ndarray]) -> None:
        """A resumed job: rows the interrupted run committed to the mask (full width, in order)."""
        if self.takes_rows:
            self.rows(window.row_off, labels)

    def commit(self) -> Path:
        raise NotImplementedError

    def abort(self, keep_partial: bool = False) -> None:
        """Remove the temporary file (with `keep_partial`, keep a journaled one for a resumed run)."""


class WriterOutput(Output):
    """A raster file written by one of `bigseg.io.writers` (the mask, probabilities or a part file)."""

    def __init__(self, writer: Writer, probabilities: bool = False, styles: tuple | None = None):
        self.writer, self.probabilities, self.styles = writer, probabilities, styles
        self.journaled = writer if isinstance(writer, GeoTiffWriter) else None

    def write(self, window, labels, probs, valid) -> None:
        if self.probabilities:
            self.writer.write(window, probs, valid)
        else:
            self.writer.write(window, labels)

    def write_nodata(self, window) -> None:
        self.writer.write_nodata(window)

    def commit(self) -> Path:
        path = self.writer.commit()
        if self.styles is not None:  # the mask's class names for GIS tools, beside it
            write_class_styles(path, *self.styles)
        return path

    def abort(self, keep_partial: bool = False) -> None:
        if keep_partial and self.journaled is not None:
            self.journaled.suspend()
        else:
            self.writer.abort()


class OverlayOutput(WriterOutput):
    """The colour preview: image pixels sampled as tiles are read, the mask blended over them."""

    def add_image(self, window, data) -> None:
        self.writer.add_image(window, data)

    def image_rows(self, window) -> Sequence[int]:
        return [int(r) for r in self.writer.rows_in(window)]

    def replay(self, window, labels, read_image) -> None:
        for r in self.image_rows(window):
            row = Window(0, int(r), window.width, 1)
            self.writer.add_image(row, read_image(row))
        self.writer.write(window, labels)


class PolygonsOutput(Output):
    """The polygons of the mask, made from its rows as they are written (`bigseg.vector.features`)."""

    takes_rows = True

    def __init__(self, features: PolygonFeatures):
        self.features = features

    def rows(self, top, labels) -> None:
        self.features.add(top, labels)

    def commit(self) -> Path:
        return self.features.commit()

    def abort(self, keep_partial: bool = False) -> None:
        self.features.abort()  # a resumed job makes them again from the rows on disk


class AreasOutput(Output):
    """Each class's pixels and ground area, counted from the mask's rows, as a CSV table."""

    takes_rows = True

    def __init__(self, path: Path, stats: AreaStats, nodata: int | None = NODATA):
        self.path, self.stats, self.nodata = path, stats, nodata

    def rows(self, top, labels) -> None:
        self.stats.add(top, labels, None if self.nodata is None else labels != self.nodata)

    def commit(self) -> Path:
        return write_text(self.path, self.stats.csv())


@dataclass(frozen=True)
class OutputKind:
    """`name`; `infix`: what marks its files' names (`.probs.`); `said`: what it is, in a sentence
    ("probabilities"); `wanted(write)`: whether a job's options ask for it (besides naming it in
    `WriteOptions.extra`, `--also NAME`); `path(target)`; `open(target)`; `format(target)`: what a
    dry run says of the file (format, bands, whether it needs BigTIFF)."""

    name: str
    infix: str
    said: str
    wanted: Callable[[WriteOptions], bool]
    path: Callable[[Target], Path]
    open: Callable[[Target], Output]
    format: Callable[[Target], dict[str, Any]] = field(default=lambda target: {})


OUTPUT_KINDS: dict[str, OutputKind] = {}


def register_output(kind: OutputKind) -> OutputKind:
    """Add (or replace) an output kind; jobs whose `WriteOptions` want it write it."""
    OUTPUT_KINDS[kind.name] = kind
    return kind


def wanted_kinds(write: WriteOptions) -> list[OutputKind]:
    """The kinds a job writes, the mask first."""
    check_kinds(write.extra)
    return [k for k in OUTPUT_KINDS.values() if k.name == "mask" or k.name in write.extra or k.wanted(write)]


def check_kinds(names: Sequence[str]) -> None:
    """Every name is a registered output kind (InputError naming them otherwise)."""
    unknown = [n for n in names if n not in OUTPUT_KINDS]
    if unknown:
        raise InputError(f"no output kind {unknown[0]!r}; there are {', '.join(OUTPUT_KINDS)}", param="also")


def _geotiff_format(target: Target, bands: int) -> dict[str, Any]:
    return {"format": "COG" if target.write.cog else "GeoTIFF", "bands": bands,
            "bigtiff": target.width * target.height * bands > BIGTIFF_BYTES}


def _open_mask(t: Target) -> Output:
    if t.png:
        return WriterOutput(PngWriter(t.dst, t.width, t.height))
    writer = GeoTiffWriter(t.dst, t.width, t.height, 1, t.georef, t.palette,
                           {"classes": list(t.classes), OUTPUT_TAG: "mask"}, cog=t.write.cog,
                           resume_rows=t.resume_rows, overviews=True)
    return WriterOutput(writer, styles=(list(t.classes), [list(p) for p in t.palette]))


def _open_probs(t: Target) -> Output:
    return WriterOutput(GeoTiffWriter(t.sibling("probs", ".tif"), t.width, t.height, len(t.classes), t.georef,
                                      tags={"classes": list(t.classes), "scale": "p = value / 255", OUTPUT_TAG: "probs"},
                                      cog=t.write.cog, mask=True, resume_rows=t.resume_rows,
                                      descriptions=[f"p({c})" for c in t.classes]), probabilities=True)


def _polygons_path(t: Target) -> Path:
    return t.sibling("polygons", vector_format((t.write.polygons or VectorOptions()).format)[1])


def _open_polygons(t: Target) -> Output:
    return PolygonsOutput(PolygonFeatures(_polygons_path(t), t.ground(), list(t.classes),
                                          t.write.polygons or VectorOptions(), str(t.dst), NODATA))


register_output(OutputKind(
    "mask", ".mask.", "a mask", lambda w: True, lambda t: t.dst, _open_mask,
    lambda t: {"format": "PNG", "bands": 1, "bigtiff": False} if t.png else _geotiff_format(t, 1)))
register_output(OutputKind(
    "probs", ".probs.", "probabilities", lambda w: w.probs, lambda t: t.sibling("probs", ".tif"), _open_probs,
    lambda t: _geotiff_format(t, len(t.classes))))
register_output(OutputKind(
    "overlay", ".overlay.", "an overlay", lambda w: w.overlay, lambda t: t.sibling("overlay", ".png"),
    lambda t: OverlayOutput(OverlayWriter(t.sibling("overlay", ".png"), t.width, t.height, t.palette,
                                          classes=list(t.classes))),
    lambda t: {"format": "PNG", "bands": 3, "bigtiff": False}))
register_output(OutputKind(
    "polygons", ".polygons.", "polygons", lambda w: w.polygons is not None, _polygons_path, _open_polygons,
    lambda t: {"format": vector_format((t.write.polygons or VectorOptions()).format)[0]}))
register_output(OutputKind(
    "areas", ".areas.", "an areas table", lambda w: w.areas, lambda t: t.sibling("areas", ".csv"),
    lambda t: AreasOutput(t.sibling("areas", ".csv"), AreaStats(list(t.classes), t.ground())),
    lambda t: {"format": "CSV"}))
