"""Writers for masks, probabilities and previews; every file goes to a temporary name first.

Masks: single-band uint8 class indices, nodata 255. Georeferenced-style inputs give a tiled,
deflate-compressed GeoTIFF (BigTIFF when needed) with the input's CRS/transform or GCPs and the
class palette as colour table; `cog=True` turns it into a cloud-optimised GeoTIFF with overviews.
PNG/JPEG inputs give a grayscale PNG of class indices. Probabilities: uint8 (p * 255), one band per
class, nodata as an internal mask. Results arrive as rectangles (windows), in no particular order.

Every writer offers the same interface (`Writer`): `write(window, data, valid)`, `commit()` (rename
into place, return the path) and `abort()` (remove the temporary file); journaled GeoTIFFs also
`sync()` and `suspend()`. Which writers a job needs and their names: `bigseg.io.outputs`.

GeoTIFFs are written one block row (BLOCK rows, full width) at a time, each when all its pixels
have arrived, so every TIFF block is written exactly once: never read back, merged and rewritten
(which would grow the file and, with a kill in the middle of an in-place rewrite, damage a block
that an interrupted job's journal relies on).
"""
from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Protocol, Sequence

import numpy as np

from bigseg.atomic import commit as _commit
from bigseg.atomic import partial_path, write_text
from bigseg.atomic import remove as _remove
from bigseg.io.gdal import captured_stderr, write_failure, writing
from bigseg.errors import OutputError, first_line
from bigseg.tiling.geometry import Georef, Window
from bigseg.palette import NODATA

BLOCK = 512
OVERVIEW_SIDE = 4096  # masks larger than this on their long side get overviews (GIS tools draw them fast)


def overview_factors(width: int, height: int, smallest: int = 256) -> list[int]:
    """2, 4, 8, ... until the overview's long side is at most `smallest` pixels."""
    factors, f = [], 2
    while max(width, height) / f >= smallest:
        factors.append(f)
        f *= 2
    return factors or [2]


def write_class_styles(mask: Path, classes: Sequence[str], palette: Sequence[Sequence[int]]) -> list[Path]:
    """What GIS tools show as class names: a GDAL PAM sidecar (`NAME.tif.aux.xml`: category names
    and a thematic raster attribute table of value, class and colour, which gdalinfo and QGIS
    read) and a QGIS style (`NAME.qml`: a paletted renderer labelled by class, loaded with the
    layer). Returns the files written (atomically)."""
    from xml.sax.saxutils import escape, quoteattr

    names = "".join(f"<Category>{escape(c)}</Category>" for c in classes)
    fields = [("Value", 0, 5), ("Class", 2, 2), ("Red", 0, 6), ("Green", 0, 7), ("Blue", 0, 8)]  # GFT_*, GFU_*
    defs = "".join(f'<FieldDefn index="{i}"><Name>{n}</Name><Type>{t}</Type><Usage>{u}</Usage></FieldDefn>'
                   for i, (n, t, u) in enumerate(fields))
    rows = "".join(f'<Row index="{i}"><F>{i}</F><F>{escape(c)}</F>' + "".join(f"<F>{int(v)}</F>" for v in palette[i][:3])
                   + "</Row>" for i, c in enumerate(classes))
    aux = (f'<PAMDataset><PAMRasterBand band="1"><CategoryNames>{names}</CategoryNames>'
           f'<GDALRasterAttributeTable tableType="thematic">{defs}{rows}</GDALRasterAttributeTable>'
           f"</PAMRasterBand></PAMDataset>\n")
    entries = "".join(f'<paletteEntry value="{i}" color="#{int(p[0]):02x}{int(p[1]):02x}{int(p[2]):02x}" alpha="255" '
                      f"label={quoteattr(c)}/>" for i, (c, p) in enumerate(zip(classes, palette)))
    qml = ("<!DOCTYPE qgis PUBLIC 'http://mrcc.com/qgis.dtd' 'SYSTEM'>\n"
           '<qgis version="3.28" styleCategories="Symbology"><pipe>'
           f'<rasterrenderer type="paletted" band="1" opacity="1"><colorPalette>{entries}</colorPalette>'
           "</rasterrenderer></pipe></qgis>\n")
    return [write_text(mask.with_name(mask.name + ".aux.xml"), aux), write_text(mask.with_suffix(".qml"), qml)]


class Writer(Protocol):
    """What every output writer offers (see the module docstring)."""

    def write(self, window: Window, data: np.ndarray, valid: np.ndarray | None = None) -> None: ...

    def write_nodata(self, window: Window) -> None: ...

    def commit(self) -> Path: ...

    def abort(self) -> None: ...


def _open_update(path: Path):
    """Reopen a partial GeoTIFF for writing (one made for a non-georeferenced input warns)."""
    import rasterio
    from rasterio.errors import NotGeoreferencedWarning

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NotGeoreferencedWarning)
        return rasterio.open(path, "r+")


class GeoTiffWriter:
    """Stream rectangles into a tiled GeoTIFF; `commit` renames it (converting to COG if asked).

    Rows are gathered per block row and each block row is written once it is complete;
    `rows_written` counts the rows on disk from the top (what a journal may record after `sync`).
    `resume_rows`: continue the partial file of an interrupted job whose first `resume_rows` rows
    (a whole number of block rows, or the height) are on disk; rectangles above are ignored."""

    def __init__(self, path: Path, width: int, height: int, count: int, georef: Georef | None,
                 palette: Sequence[Sequence[int]] | None = None, tags: dict | None = None,
                 cog: bool = False, mask: bool = False, resume_rows: int = 0,
                 descriptions: Sequence[str] | None = None, overviews: bool = False):
        import rasterio
        from rasterio.errors import NotGeoreferencedWarning

        self.path, self.cog, self.mask, self.overviews = path, cog, mask, overviews
        self.width, self.height, self.count = width, height, count
        self.tmp = partial_path(path)
        self.rows_written = 0
        # block row -> [data (count, h, W) or None (nodata only so far), valid (h, W) or None, rows, pixels]
        self._bands: dict[int, list] = {}
        self._done_bands: set[int] = set()
        self._empty_bands = 0
        if resume_rows:
            self._reopen_partial(resume_rows)
            return
        profile = dict(driver="GTiff", width=width, height=height, count=count, dtype="uint8",
                       tiled=True, blockxsize=BLOCK, blockysize=BLOCK, compress="deflate",
                       predictor=2 if mask else 1, BIGTIFF="IF_SAFER", SPARSE_OK=True)
        if not mask:
            profile["nodata"] = NODATA
        if georef is not None and georef.transform is not None and georef.gcps is None:
            profile.update(crs=georef.crs, transform=georef.transform)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", NotGeoreferencedWarning)
                self.ds = rasterio.open(self.tmp, "w", **profile)
        except Exception as e:
            raise OutputError(f"cannot write {path}: {first_line(e)}") from None
        if georef is not None and georef.gcps:
            self.ds.gcps = (georef.gcps, georef.gcps_crs)
        if palette is not None:
            cmap = {i: (*map(int, c[:3]), 255) for i, c in enumerate(palette[:NODATA])}
            cmap[NODATA] = (0, 0, 0, 0)
            self.ds.write_colormap(1, cmap)
        if tags:
            self.ds.update_tags(**{k: json.dumps(v) if not isinstance(v, str) else v for k, v in tags.items()})
        for band, text in enumerate(descriptions or (), 1):
            self.ds.set_band_description(band, text)
        if mask:  # create the internal mask now: a file whose every block is nodata is all masked
            from rasterio.windows import Window as RWindow

            self.ds.write_mask(np.zeros((1, 1), np.uint8), window=RWindow(0, 0, 1, 1))

    def _reopen_partial(self, rows: int) -> None:
        """Open the interrupted job's file and check that it is this job's and that its last
        finished block row decodes; OutputError otherwise (the caller starts over)."""
        from rasterio.windows import Window as RWindow

        if rows != self.height and rows % BLOCK:
            raise OutputError(f"cannot resume {self.tmp}: {rows} rows is not a whole number of block rows")
        try:
            self.ds = _open_update(self.tmp)
        except Exception as e:
            raise OutputError(f"cannot resume {self.tmp}: {first_line(e)}") from None
        if (self.ds.width, self.ds.height, self.ds.count) != (self.width, self.height, self.count):
            self.ds.close()
            raise OutputError(f"cannot resume {self.tmp}: it is not this job's partial output")
        top = max(0, rows - BLOCK)
        try:
            self.ds.read(window=RWindow(0, top, self.width, rows - top))
        except Exception as e:
            self.ds.close()
            raise OutputError(f"cannot resume {self.tmp}: {first_line(e)}") from None
        self.rows_written = rows
        self._done_bands = set(range(-(-rows // BLOCK)))

    def write(self, window: Window, data: np.ndarray, valid: np.ndarray | None = None) -> None:
        """`data`: (h, w) or (count, h, w) uint8 for `window`; `valid` feeds the internal mask."""
        data = data[None] if data.ndim == 2 else data
        for band, (r0, r1), rows_in in self._bands_of(window):
            held = self._bands[band]
            if held[0] is None:  # the first real pixels of this block row
                held[0] = np.full((self.count, held[2], self.width), 0 if self.mask else NODATA, np.uint8)
                held[1] = np.zeros((held[2], self.width), bool) if self.mask else None
                held[4] = [window.col_off, window.col_end]
            held[4] = [min(held[4][0], window.col_off), max(held[4][1], window.col_end)]
            b0 = band * BLOCK
            held[0][:, r0 - b0:r1 - b0, window.col_off:window.col_end] = data[:, rows_in]
            if held[1] is not None and valid is not None:
                held[1][r0 - b0:r1 - b0, window.col_off:window.col_end] = valid[rows_in]
            self._arrived(band, (r1 - r0) * window.width)

    def write_nodata(self, window: Window) -> None:
        """`window` holds no valid pixel: nodata (0 and masked out for a masked file), at no cost."""
        for band, (r0, r1), _ in self._bands_of(window):
            self._arrived(band, (r1 - r0) * window.width)

    def _bands_of(self, window: Window):
        """(block row, its rows in the window, those rows in window coordinates) still to write."""
        top = max(window.row_off, self.rows_written)
        for band in range(top // BLOCK, (window.row_end - 1) // BLOCK + 1):
            b0, b1 = band * BLOCK, min((band + 1) * BLOCK, self.height)
            r0, r1 = max(top, b0), min(window.row_end, b1)
            if r0 >= r1 or band in self._done_bands:
                continue
            self._bands.setdefault(band, [None, None, b1 - b0, 0, None])
            yield band, (r0, r1), slice(r0 - window.row_off, r1 - window.row_off)

    def _arrived(self, band: int, pixels: int) -> None:
        held = self._bands[band]
        held[3] += pixels
        if held[3] >= held[2] * self.width:
            self._write_band(band)

    def _write_band(self, band: int) -> None:
        from rasterio.windows import Window as RWindow

        data, valid, rows, _, columns = self._bands.pop(band)
        self._empty_bands += data is None
        if data is not None:  # a block row of nodata only is not written: the file is sparse there
            # only the blocks that received data: the ones beside them are nodata and stay absent
            c0, c1 = columns[0] // BLOCK * BLOCK, min(self.width, -(-columns[1] // BLOCK) * BLOCK)
            w = RWindow(c0, band * BLOCK, c1 - c0, rows)
            with writing(self.path, self.tmp):
                self.ds.write(data[:, :, c0:c1], window=w)
                if valid is not None:
                    self.ds.write_mask((valid[:, c0:c1] * 255).astype(np.uint8), window=w)
        self._done_bands.add(band)
        while self.rows_written < self.height and self.rows_written // BLOCK in self._done_bands:
            self.rows_written = min(self.height, self.rows_written + BLOCK)

    @property
    def mostly_empty(self) -> bool:
        """Over 90% of the block rows held nodata only (and were not written: a sparse file).
        Such a mask gets no overviews: building them would read every pixel, and GIS tools skip
        its absent blocks quickly anyway."""
        return self._empty_bands > 0.9 * -(-self.height // BLOCK)

    def tag(self, **tags: str) -> None:
        """Add metadata tags (strings) to the file."""
        self.ds.update_tags(**tags)

    def sync(self) -> None:
        """Close and reopen: every finished block row is on disk (fsync'd, so that a journal
        written next never outlives the data after a power loss), with a valid TIFF directory."""
        with writing(self.path, self.tmp):
            self.ds.close()
        fd = os.open(self.tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        self.ds = _open_update(self.tmp)

    def read(self, window: Window) -> np.ndarray:
        from rasterio.windows import Window as RWindow

        return self.ds.read(window=RWindow(window.col_off, window.row_off, window.width, window.height))

    def commit(self) -> Path:
        import rasterio.shutil

        if self.rows_written < self.height:
            self.abort()
            raise OutputError(f"cannot write {self.path}: rows {self.rows_written}.. were never computed")
        if self.overviews and not self.cog and max(self.width, self.height) > OVERVIEW_SIDE and not self.mostly_empty:
            from rasterio.enums import Resampling

            with writing(self.path, self.tmp):
                self.ds.build_overviews(overview_factors(self.width, self.height), Resampling.nearest)
        with writing(self.path, self.tmp):
            self.ds.close()
        if self.cog:
            cog_tmp = self.tmp.with_name(self.tmp.name + ".cog.tif")
            try:
                with writing(self.path, cog_tmp):
                    rasterio.shutil.copy(self.tmp, cog_tmp, driver="COG", COMPRESS="DEFLATE", SPARSE_OK=True,
                                         BIGTIFF="IF_SAFER", OVERVIEW_RESAMPLING="NEAREST", BLOCKSIZE=BLOCK)
            finally:
                _remove(self.tmp)
            _commit(cog_tmp, self.path)
        else:
            _commit(self.tmp, self.path)
        return self.path

    def suspend(self) -> None:
        """Close, keeping the partial file for a resumed run."""
        self.ds.close()

    def abort(self) -> None:
        try:
            with captured_stderr():  # a write that failed fails again as it closes: said once already
                self.ds.close()
        except Exception:  # the same failure again; the partial file goes anyway
            pass
        finally:
            _remove(self.tmp)
            _remove(self.tmp.with_name(self.tmp.name + ".cog.tif"))


class PngWriter:
    """Grayscale PNG of class indices; PNG has no windows, so rows are gathered and encoded at the end
    (the input image is held whole by its reader anyway)."""

    def __init__(self, path: Path, width: int, height: int):
        self.path, self.tmp = path, partial_path(path)
        self.array = np.full((height, width), NODATA, np.uint8)

    def write(self, window: Window, data: np.ndarray, valid: np.ndarray | None = None) -> None:
        self.array[window.slices] = data

    def write_nodata(self, window: Window) -> None:
        """Nothing to do: the mask starts as nodata."""

    def commit(self) -> Path:
        import cv2

        try:
            with captured_stderr() as printed:
                ok = cv2.imwrite(str(self.tmp), self.array)
        except cv2.error as e:
            ok, reason = False, str(e)
        else:
            reason = write_failure(self.tmp, None, printed)
        if not ok:
            _remove(self.tmp)
            raise OutputError(f"cannot write {self.path}: {reason}")
        return _commit(self.tmp, self.path)

    def abort(self) -> None:
        _remove(self.tmp)


class OverlayWriter:
    """A colour preview of the mask blended over the image, at most `max_side` pixels on the long
    side, with a legend of the classes it shows (name and colour) when `classes` are given. The
    image pixels it samples are kept as tiles are read (`add_image`), so no input row is read
    twice; each rectangle of labels is blended in as it arrives. Memory: the preview and its image
    samples, bounded by `max_side` whatever the raster's size."""

    def __init__(self, path: Path, width: int, height: int, palette, max_side: int = 2048, alpha: float = 0.5,
                 classes: list[str] | None = None):
        f = max(width, height) / max_side if max(width, height) > max_side else 1.0
        self.rows = np.minimum((np.arange(int(round(height / f))) * f + f / 2).astype(np.int64), height - 1)
        self.cols = np.minimum((np.arange(int(round(width / f))) * f + f / 2).astype(np.int64), width - 1)
        self.preview = np.zeros((len(self.rows), len(self.cols), 3), np.uint8)
        self.image = np.zeros((len(self.rows), len(self.cols), 3), np.float32)
        lut = np.zeros((256, 3), np.float32)
        lut[:len(palette[:NODATA])] = np.asarray(palette[:NODATA], np.float32)[:, :3]
        self.lut, self.alpha = lut, alpha
        self.path, self.tmp = path, partial_path(path)
        self.classes = list(classes or [])
        self.shown = np.zeros(256, bool)  # class values the preview shows

    def _sampled(self, window: Window) -> tuple[np.ndarray, np.ndarray]:
        pi = np.nonzero((self.rows >= window.row_off) & (self.rows < window.row_end))[0]
        pj = np.nonzero((self.cols >= window.col_off) & (self.cols < window.col_end))[0]
        return pi, pj

    def rows_in(self, window: Window) -> np.ndarray:
        """Image rows (absolute) the preview samples inside `window`."""
        return np.unique(self.rows[self._sampled(window)[0]])

    def add_image(self, window: Window, data: np.ndarray) -> None:
        """Keep the samples of the (3, h, w) image values of `window` (0..255, as the model reads them)."""
        pi, pj = self._sampled(window)
        if len(pi) and len(pj):
            block = data[:, self.rows[pi] - window.row_off][:, :, self.cols[pj] - window.col_off]
            self.image[np.ix_(pi, pj)] = np.moveaxis(block, 0, -1)

    def write(self, window: Window, labels: np.ndarray | None, valid: np.ndarray | None = None) -> None:
        """Blend the (h, w) labels of `window` into the preview; NODATA (or `labels` None: no
        valid pixel at all) shows the bare image, as far as it was read."""
        pi, pj = self._sampled(window)
        if not len(pi) or not len(pj):
            return
        if labels is None:
            lab = np.full((len(pi), len(pj)), NODATA, np.uint8)
        else:
            lab = labels[np.ix_(self.rows[pi] - window.row_off, self.cols[pj] - window.col_off)]
        self.shown[np.unique(lab)] = True
        img = self.image[np.ix_(pi, pj)]
        blend = np.where((lab == NODATA)[..., None], img, (1 - self.alpha) * img + self.alpha * self.lut[lab])
        self.preview[np.ix_(pi, pj)] = np.clip(blend, 0, 255).astype(np.uint8)

    def write_nodata(self, window: Window) -> None:
        self.write(window, None)

    def legend(self) -> np.ndarray:
        """The preview with a legend in its lower left corner: a swatch and the name of each class
        it shows, on a light panel; the bare preview where it is too small to hold one."""
        import cv2

        items = [(i, self.classes[i]) for i in np.nonzero(self.shown[:len(self.classes)])[0]]
        out = self.preview.copy()
        h, w = out.shape[:2]
        if not items:
            return out
        font, scale = cv2.FONT_HERSHEY_SIMPLEX, max(0.4, min(h, w) / 1000)
        thick = max(1, round(scale * 1.6))
        text_h = cv2.getTextSize("Ag", font, scale, thick)[0][1]
        line, pad = int(text_h * 1.9) + 2, max(4, text_h // 2)
        swatch = line - pad
        width = max(cv2.getTextSize(name, font, scale, thick)[0][0] for _, name in items) + swatch + 3 * pad
        height = line * len(items) + pad
        if width + 2 * pad > w or height + 2 * pad > h:
            return out
        x0, y0 = pad, h - height - pad
        panel = out[y0:y0 + height, x0:x0 + width].astype(np.float32)
        out[y0:y0 + height, x0:x0 + width] = (0.25 * panel + 0.75 * 255).astype(np.uint8)
        for k, (value, name) in enumerate(items):
            top = y0 + pad + k * line
            colour = tuple(int(c) for c in self.lut[value])
            cv2.rectangle(out, (x0 + pad, top), (x0 + pad + swatch, top + swatch), colour, -1)
            cv2.rectangle(out, (x0 + pad, top), (x0 + pad + swatch, top + swatch), (40, 40, 40), 1)
            baseline = top + (swatch + text_h) // 2
            cv2.putText(out, name, (x0 + 2 * pad + swatch, baseline), font, scale, (20, 20, 20), thick, cv2.LINE_AA)
        return out

    def commit(self) -> Path:
        import cv2

        with captured_stderr() as printed:
            ok = cv2.imwrite(str(self.tmp), self.legend()[..., ::-1])
        if not ok:
            reason = write_failure(self.tmp, None, printed)
            _remove(self.tmp)
            raise OutputError(f"cannot write {self.path}: {reason}")
        return _commit(self.tmp, self.path)

    def abort(self) -> None:
        _remove(self.tmp)
