"""Every file of one predict job, as one `OutputSet` of the registered output kinds
(`bigseg.io.kinds`): the mask, and as asked its probabilities, overlay, polygons and areas table.
Output names are made here and in the kinds (`city.mask.tif`, `city.probs.tif`, hidden part files of
a distributed job). Used as a context manager an OutputSet commits every file atomically when the
block ends normally and aborts them all on an error (keeping the partial files an interrupted job's
journal points into, see `keep_partial`). The kinds that need the mask's rows in order (polygons,
areas) get them as the mask is written (`RowFeed`), never by reading it back.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import numpy as np

from bigseg.errors import InputError
from bigseg.io.kinds import (OUTPUT_TAG, Output, Target, WriteOptions, WriterOutput, sibling, wanted_kinds,
                             writes_png)
from bigseg.io.kinds import OUTPUT_KINDS
from bigseg.io.readers import IMAGE_SUFFIXES
from bigseg.io.writers import BLOCK, GeoTiffWriter
from bigseg.palette import NODATA
from bigseg.tiling.geometry import Georef, Window

__all__ = ["OUTPUT_TAG", "OutputSet", "Target", "WriteOptions", "sibling", "writes_png"]

MASK_SUFFIXES = (".tif", ".tiff", ".png")


# --- names ---------------------------------------------------------------------------------------

def _infixes() -> list[tuple[str, str]]:
    """(name part, what the file is) of every kind of file bigseg writes, the mask's last."""
    kinds = sorted(OUTPUT_KINDS.values(), key=lambda k: k.name == "mask")
    return [(".partial", "a partial file")] + [(k.infix, k.said) for k in kinds]


def is_output_name(path: Path) -> bool:
    """Whether `path` is named as a file bigseg writes (`NAME.mask.tif`, `.probs.`, `.overlay.`, partials)."""
    return any(part in path.name for part, _ in _infixes())


def output_kind(path: Path) -> str | None:
    """"a mask", "probabilities", "an overlay", ... or "a partial file" when `path` is one bigseg
    wrote (by its name, or by the tag in a GeoTIFF renamed since), else None."""
    for part, kind in _infixes():
        if part in path.name:
            return kind
    if path.suffix.lower() in (".tif", ".tiff") and isinstance(path, Path):  # a remote file is not opened to ask
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
    """`<folder>/<relative stem>.mask.png` for local PNG/JPEG-like inputs, `.mask.tif` for rasters
    and for anything remote (read by GDAL)."""
    ext = ".png" if src.suffix.lower() in IMAGE_SUFFIXES and isinstance(src, Path) else ".tif"
    return folder / relative.parent / f"{relative.stem}.mask{ext}"


def names_one_file(out: Path) -> bool:
    """Whether `--out` names a mask file rather than a folder."""
    return out.suffix.lower() in MASK_SUFFIXES and not out.is_dir()


def check_mask_file(src: Path, out: Path) -> None:
    """A mask file name given for `src` must be writable in its format and not the input itself."""
    if out.suffix.lower() == ".png" and (src.suffix.lower() not in IMAGE_SUFFIXES or not isinstance(src, Path)):
        raise InputError(f"{out}: {src.name} is written as a GeoTIFF (it keeps georeferencing "
                         f"and streams); use a .tif name", param="out")
    if out.resolve() == src.resolve():
        raise InputError(f"{out} is the input itself; choose another name", param="out")


def part_path(dst: Path, part: int, parts: int, tag: str = "") -> Path:
    """The hidden file of one part of a distributed job: `.NAME[.TAG].part-PPP-of-NNN.tif`."""
    stem = dst.stem if not tag else f"{dst.stem}.{tag}"
    return dst.with_name(f".{stem}.part-{part:03d}-of-{parts:03d}.tif")


def output_paths(dst: Path, write: WriteOptions) -> list[Path]:
    """Every file a job writes for the mask `dst`, the mask first."""
    target = Target(dst, "raster", 0, 0, None, [], [], write)
    return [k.path(target) for k in wanted_kinds(write)]


def describe(dst: Path, kind: str, width: int, height: int, classes: int, write: WriteOptions) -> list[dict]:
    """The files a job would write, without creating them (for a dry run)."""
    target = Target(dst, kind, width, height, None, [str(c) for c in range(classes)], [], write)
    return [{"path": str(k.path(target)), **k.format(target)} for k in wanted_kinds(write)]


# --- the files of one job ------------------------------------------------------------------------

class RowFeed:
    """Finished rectangles of a `width` x `height` mask (any order) -> its full-width rows from top
    to bottom, a block row at a time as soon as every row above it is complete. `start`: rows above
    it are done already (a resumed job). Holds at most the block rows still incomplete."""

    def __init__(self, width: int, height: int, start: int = 0):
        self.width, self.height, self.next = width, height, start
        self._held: dict[int, list] = {}  # block row -> [labels (h, width), pixels arrived]

    def add(self, window: Window, labels: np.ndarray | None) -> list[tuple[int, np.ndarray]]:
        """A rectangle's labels (None: nodata only); returns the rows it completes, (top, rows)."""
        top = max(window.row_off, self.next)
        for band in range(top // BLOCK, (window.row_end - 1) // BLOCK + 1):
            b0, b1 = band * BLOCK, min((band + 1) * BLOCK, self.height)
            r0, r1 = max(top, b0), min(window.row_end, b1)
            if r0 >= r1:
                continue
            held = self._held.setdefault(band, [np.full((b1 - b0, self.width), NODATA, np.uint8), 0])
            if labels is not None:
                held[0][r0 - b0:r1 - b0, window.col_off:window.col_end] = labels[r0 - window.row_off:r1 - window.row_off]
            held[1] += (r1 - r0) * window.width
        done = []
        while self.next < self.height:
            band = self.next // BLOCK
            held = self._held.get(band)
            rows = held[0][self.next - band * BLOCK:] if held is not None else None
            if rows is None or held[1] < len(rows) * self.width:
                break
            del self._held[band]
            done.append((self.next, rows))
            self.next += len(rows)
        return done


class OutputSet:
    """The files of one image (or one part of it): `outputs` by kind name, the mask first.

    `write(window, labels, probs, valid)` takes a finished rectangle: labels become NODATA and
    probabilities 0 where the input is invalid. Rows arrive in any order; GeoTIFFs write each
    block row once (`rows_on_disk`, `sync` for a journal)."""

    def __init__(self, outputs: dict[str, Output], width: int, height: int, row_offset: int = 0,
                 resume_rows: int = 0):
        self.outputs = outputs
        self.row_offset = row_offset  # a part file's first row in the image
        self.keep_partial = False     # set when a journal points into the partial files
        self.written: list[Path] = []
        self.feed = RowFeed(width, height, resume_rows) if any(o.takes_rows for o in outputs.values()) else None

    @classmethod
    def create(cls, dst: Path, kind: str, width: int, height: int, georef: Georef | None,
               classes, palette, write: WriteOptions, resume_rows: int = 0) -> OutputSet:
        """The outputs of a whole image; `resume_rows`: continue an interrupted job's partial files."""
        target = Target(dst, kind, width, height, georef, classes, palette, write, resume_rows)
        return cls(_opened({k.name: (lambda k=k: k.open(target)) for k in wanted_kinds(write)}), width, height,
                   resume_rows=resume_rows)

    @classmethod
    def part(cls, dst: Path, part: int, parts: int, width: int, rows: tuple[int, int], classes: int,
             probs: bool, fingerprint: str) -> OutputSet:
        """Rows [top, bottom) of the mask (and probabilities) of a distributed job, in hidden part
        files tagged with the job's fingerprint (no georeference: the assembled output has it)."""
        top, bottom = rows
        tags = {"bigseg_fingerprint": fingerprint}
        opens = {"mask": lambda: WriterOutput(GeoTiffWriter(part_path(dst, part, parts), width, bottom - top, 1,
                                                            None, tags=tags))}
        if probs:
            opens["probs"] = lambda: WriterOutput(GeoTiffWriter(part_path(dst, part, parts, "probs"), width,
                                                                bottom - top, classes, None, tags=tags, mask=True),
                                                  probabilities=True)
        return cls(_opened(opens), width, bottom - top, row_offset=top)

    @property
    def probabilities(self) -> bool:
        """Whether a file of this set needs the class probabilities."""
        return "probs" in self.outputs

    @property
    def _journaled(self) -> list[GeoTiffWriter]:
        return [o.journaled for o in self.outputs.values() if o.journaled is not None]

    @property
    def rows_on_disk(self) -> int:
        """Rows from the top that every GeoTIFF has written (whole block rows, never rewritten)."""
        return min((w.rows_written for w in self._journaled), default=0)

    def add_image(self, window: Window, data: np.ndarray) -> None:
        """Image values as the model reads them (for the overlay preview)."""
        for o in self.outputs.values():
            o.add_image(window, data)

    def image_rows(self, window: Window) -> list[int]:
        """The rows of `window` whose input pixels an output samples (the rest need not be read)."""
        return sorted({r for o in self.outputs.values() for r in o.image_rows(window)})

    def write(self, window: Window, labels: np.ndarray, probs: np.ndarray | None = None,
              valid: np.ndarray | None = None) -> None:
        if self.row_offset:
            window = Window(window.col_off, window.row_off - self.row_offset, window.width, window.height)
        if valid is not None:
            labels[~valid] = NODATA
            if probs is not None:
                probs[:, ~valid] = 0
        for o in self.outputs.values():
            o.write(window, labels, probs, valid)
        self._feed(window, labels)

    def write_nodata(self, window: Window) -> None:
        """A finished rectangle without a single valid pixel (nothing was predicted there)."""
        if self.row_offset:
            window = Window(window.col_off, window.row_off - self.row_offset, window.width, window.height)
        for o in self.outputs.values():
            o.write_nodata(window)
        self._feed(window, None)

    def _feed(self, window: Window, labels: np.ndarray | None) -> None:
        if self.feed is not None:
            for top, rows in self.feed.add(window, labels):
                for o in self.outputs.values():
                    if o.takes_rows:
                        o.rows(top, rows)

    def replay(self, rows: int, read_image: Callable[[Window], np.ndarray]) -> None:
        """A resumed job: the first `rows` rows of the partial mask on disk, to the files made from
        the mask (polygons, areas, overlay); `read_image` reads the input's pixels of a window."""
        mask = self.outputs["mask"].journaled
        for top in range(0, rows, BLOCK):
            window = Window(0, top, mask.width, min(BLOCK, rows - top))
            labels = mask.read(window)[0]
            for o in self.outputs.values():
                o.replay(window, labels, read_image)

    def tag(self, **tags: str) -> None:
        """Metadata tags on the mask (GeoTIFF only)."""
        mask = self.outputs["mask"].journaled
        if mask is not None:
            mask.tag(**tags)

    def sync(self) -> None:
        for w in self._journaled:
            w.sync()

    def commit(self) -> list[Path]:
        """Rename every file into place, the mask first."""
        self.written = [o.commit() for o in self.outputs.values()]
        return self.written

    def abort(self) -> None:
        """Remove every temporary file, or with `keep_partial` close them for a resumed run."""
        for o in self.outputs.values():
            o.abort(self.keep_partial)

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


def _opened(opens: dict[str, Callable[[], Output]]) -> dict[str, Output]:
    """The outputs opened in order; those already open are aborted if one fails."""
    outputs: dict[str, Output] = {}
    try:
        for name, open_one in opens.items():
            outputs[name] = open_one()
    except BaseException:
        for o in outputs.values():
            o.abort()
        raise
    return outputs
