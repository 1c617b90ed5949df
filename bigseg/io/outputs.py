"""Every file of one predict job, as one `OutputSet`: the only place that decides PNG or GeoTIFF,
builds output names (`city.mask.tif`, `city.probs.tif`, `city.overlay.png`, hidden part files of
a distributed job) and sets nodata. Used as a context manager it commits every file atomically
when the block ends normally and aborts them all on an error (keeping the partial files an
interrupted job's journal points into, see `keep_partial`).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from bigseg.vector.areas import AreaStats
from bigseg.errors import InputError
from bigseg.tiling.geometry import Window
from bigseg.io.readers import IMAGE_SUFFIXES, Georef
from bigseg.io.writers import (
    NODATA,
    GeoTiffWriter,
    OverlayWriter,
    PngWriter,
    Writer,
    write_class_styles,
)

MASK_SUFFIXES = (".tif", ".tiff", ".png")
_OURS = (".mask.", ".probs.", ".overlay.", ".polygons.", ".areas.", ".partial")
BIGTIFF_BYTES = 4e9 / 1.1  # GDAL's BIGTIFF=IF_SAFER threshold


@dataclass(frozen=True)
class WriteOptions:
    probs: bool = False
    overlay: bool = False
    cog: bool = False
    seams: bool = False  # report how often neighbouring tiles disagree in their overlaps (a mask tag)


# --- names ---------------------------------------------------------------------------------------

OUTPUT_TAG = "bigseg_output"  # a GeoTIFF tag on every mask and probabilities file bigseg writes


def is_output_name(path: Path) -> bool:
    """Whether `path` is named as a file bigseg writes (`NAME.mask.tif`, `.probs.`, `.overlay.`, partials)."""
    return any(part in path.name for part in _OURS)


def output_kind(path: Path) -> str | None:
    """"a mask", "probabilities", "an overlay" or "a partial file" when `path` is one bigseg wrote
    (by its name, or by the tag in a GeoTIFF renamed since), else None."""
    name = path.name
    for part, kind in ((".partial", "a partial file"), (".overlay.", "an overlay"), (".probs.", "probabilities"),
                       (".polygons.", "polygons"), (".areas.", "an areas table"), (".mask.", "a mask")):
        if part in name:
            return kind
    if path.suffix.lower() in (".tif", ".tiff"):
        import warnings

        import rasterio

        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                with rasterio.open(path) as ds:
                    tag = ds.tags().get(OUTPUT_TAG)
        except Exception:  # not readable: the job says what it is
            return None
        return {"mask": "a mask", "probs": "probabilities"}.get(tag)
    return None


def mask_path(src: Path, relative: Path, folder: Path) -> Path:
    """`<folder>/<relative stem>.mask.png` for PNG/JPEG-like inputs, `.mask.tif` for rasters."""
    ext = ".png" if src.suffix.lower() in IMAGE_SUFFIXES else ".tif"
    return folder / relative.parent / f"{relative.stem}.mask{ext}"


def names_one_file(out: Path) -> bool:
    """Whether `--out` names a mask file rather than a folder."""
    return out.suffix.lower() in MASK_SUFFIXES and not out.is_dir()


def check_mask_file(src: Path, out: Path) -> None:
    """A mask file name given for `src` must be writable in its format and not the input itself."""
    if out.suffix.lower() == ".png" and src.suffix.lower() not in IMAGE_SUFFIXES:
        raise InputError(f"{out}: {src.name} is written as a GeoTIFF (it keeps georeferencing "
                         f"and streams); use a .tif name", param="out")
    if out.resolve() == src.resolve():
        raise InputError(f"{out} is the input itself; choose another name", param="out")


def writes_png(kind: str, dst: Path) -> bool:
    """PNG for image inputs (PNG/JPEG) written to a .png name; GeoTIFF for everything else."""
    return kind == "image" and dst.suffix.lower() == ".png"


def sibling(path: Path, tag: str, suffix: str) -> Path:
    """`city.mask.tif` -> `city.probs.tif`; `out.tif` -> `out.probs.tif`."""
    stem = path.name[: -len(".mask" + path.suffix)] if path.name.endswith(".mask" + path.suffix) else path.stem
    return path.with_name(f"{stem}.{tag}{suffix}")


def part_path(dst: Path, part: int, parts: int, tag: str = "") -> Path:
    """The hidden file of one part of a distributed job: `.NAME[.TAG].part-PPP-of-NNN.tif`."""
    stem = dst.stem if not tag else f"{dst.stem}.{tag}"
    return dst.with_name(f".{stem}.part-{part:03d}-of-{parts:03d}.tif")


def describe(dst: Path, kind: str, width: int, height: int, classes: int, write: WriteOptions) -> list[dict]:
    """The files an OutputSet would write, without creating them (for a dry run)."""
    png = writes_png(kind, dst)
    tif = "COG" if write.cog else "GeoTIFF"
    out = [{"path": str(dst), "format": "PNG" if png else tif, "bands": 1,
            "bigtiff": (not png) and width * height > BIGTIFF_BYTES}]
    if write.probs:
        out.append({"path": str(sibling(dst, "probs", ".tif")), "format": tif, "bands": classes,
                    "bigtiff": width * height * classes > BIGTIFF_BYTES})
    if write.overlay:
        out.append({"path": str(sibling(dst, "overlay", ".png")), "format": "PNG", "bands": 3, "bigtiff": False})
    return out


# --- the files of one job ------------------------------------------------------------------------

class OutputSet:
    """The mask, and with `write` the probabilities and overlay, of one image (or one part of it).

    `write(window, labels, probs, valid)` takes a finished rectangle: labels become NODATA and
    probabilities 0 where the input is invalid. Rows arrive in any order; GeoTIFFs write each
    block row once (`rows_on_disk`, `sync` for a journal)."""

    def __init__(self, writers: dict[str, Writer], row_offset: int = 0):
        self.writers = writers
        self.row_offset = row_offset  # a part file's first row in the image
        self.keep_partial = False     # set when a journal points into the partial files
        self.written: list[Path] = []
        self.styles: tuple[list[str], list[list[int]]] | None = None  # class names for GIS tools
        self.areas: AreaStats | None = None  # per-class areas, counted as the mask is written

    @classmethod
    def create(cls, dst: Path, kind: str, width: int, height: int, georef: Georef | None,
               classes: Sequence[str], palette: Sequence[Sequence[int]], write: WriteOptions,
               resume_rows: int = 0) -> OutputSet:
        """The outputs of a whole image; `resume_rows`: continue an interrupted job's partial files."""
        def open_writers(writers: dict) -> None:
            if writes_png(kind, dst):
                writers["mask"] = PngWriter(dst, width, height)
            else:
                writers["mask"] = GeoTiffWriter(dst, width, height, 1, georef, palette,
                                                {"classes": list(classes), OUTPUT_TAG: "mask"},
                                                cog=write.cog, resume_rows=resume_rows, overviews=True)
            if write.probs:
                writers["probs"] = GeoTiffWriter(sibling(dst, "probs", ".tif"), width, height, len(classes), georef,
                                                 tags={"classes": list(classes), "scale": "p = value / 255",
                                                       OUTPUT_TAG: "probs"},
                                                 cog=write.cog, mask=True, resume_rows=resume_rows,
                                                 descriptions=[f"p({c})" for c in classes])
            if write.overlay:
                writers["overlay"] = OverlayWriter(sibling(dst, "overlay", ".png"), width, height, palette,
                                                   classes=list(classes))
        outputs = cls(_opened(open_writers))
        if not writes_png(kind, dst):
            outputs.styles = (list(classes), [list(p) for p in palette])
        return outputs

    @classmethod
    def part(cls, dst: Path, part: int, parts: int, width: int, rows: tuple[int, int], classes: int,
             probs: bool, fingerprint: str) -> OutputSet:
        """Rows [top, bottom) of the mask (and probabilities) of a distributed job, in hidden part
        files tagged with the job's fingerprint (no georeference: the assembled output has it)."""
        top, bottom = rows
        tags = {"bigseg_fingerprint": fingerprint}

        def open_writers(writers: dict) -> None:
            writers["mask"] = GeoTiffWriter(part_path(dst, part, parts), width, bottom - top, 1, None, tags=tags)
            if probs:
                writers["probs"] = GeoTiffWriter(part_path(dst, part, parts, "probs"), width, bottom - top,
                                                 classes, None, tags=tags, mask=True)
        return cls(_opened(open_writers), row_offset=top)

    @property
    def resumable(self) -> bool:
        return all(w.resumable for w in self.writers.values())

    @property
    def rows_on_disk(self) -> int:
        """Rows from the top that every GeoTIFF has written (whole block rows, never rewritten)."""
        return min((w.rows_written for w in self.writers.values() if isinstance(w, GeoTiffWriter)), default=0)

    @property
    def overlay(self) -> OverlayWriter | None:
        return self.writers.get("overlay")

    def add_image(self, window: Window, data: np.ndarray) -> None:
        """Image values as the model reads them, for the overlay preview (no-op without one)."""
        if self.overlay is not None:
            self.overlay.add_image(window, data)

    def write(self, window: Window, labels: np.ndarray, probs: np.ndarray | None = None,
              valid: np.ndarray | None = None) -> None:
        if self.row_offset:
            window = Window(window.col_off, window.row_off - self.row_offset, window.width, window.height)
        if valid is not None:
            labels[~valid] = NODATA
        if self.areas is not None:
            self.areas.add(window.row_off, labels)
        self.writers["mask"].write(window, labels)
        if "probs" in self.writers:
            if valid is not None:
                probs[:, ~valid] = 0
            self.writers["probs"].write(window, probs, valid)
        if self.overlay is not None:
            self.overlay.write(window, labels)

    def write_nodata(self, window: Window) -> None:
        """A finished rectangle without a single valid pixel (nothing was predicted there)."""
        if self.row_offset:
            window = Window(window.col_off, window.row_off - self.row_offset, window.width, window.height)
        if self.areas is not None:
            self.areas.add_nodata(window.row_off, window.width, window.height)
        for writer in self.writers.values():
            writer.write_nodata(window)

    def tag(self, **tags: str) -> None:
        """Metadata tags on the mask (GeoTIFF only)."""
        mask = self.writers["mask"]
        if isinstance(mask, GeoTiffWriter):
            mask.tag(**tags)

    def sync(self) -> None:
        for w in self.writers.values():
            if isinstance(w, GeoTiffWriter):
                w.sync()

    def commit(self) -> list[Path]:
        """Rename every file into place; the mask's class names for GIS tools go beside it."""
        self.written = [w.commit() for w in self.writers.values()]
        if self.styles is not None:
            write_class_styles(self.written[0], *self.styles)
        return self.written

    def abort(self) -> None:
        """Remove every temporary file, or with `keep_partial` close them for a resumed run."""
        for w in self.writers.values():
            if self.keep_partial and isinstance(w, GeoTiffWriter):
                w.suspend()
            else:
                w.abort()

    def __enter__(self) -> OutputSet:
        return self

    def __exit__(self, kind: Any, error: Any, trace: Any) -> None:
        if kind is not None:
            self.abort()
            return
        try:
            self.commit()
        except BaseException:
            self.abort()
            raise


def _opened(open_writers) -> dict[str, Writer]:
    """Writers opened by `open_writers(into)`; those already open are aborted if one fails."""
    writers: dict[str, Writer] = {}
    try:
        open_writers(writers)
    except BaseException:
        for w in writers.values():
            w.abort()
        raise
    return writers
