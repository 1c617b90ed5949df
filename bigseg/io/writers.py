"""Writers for masks, probabilities and previews; every file goes to a temporary name first.

Masks: single-band uint8 class indices, nodata 255. Georeferenced-style inputs give a tiled,
deflate-compressed GeoTIFF (BigTIFF when needed) with the input's CRS/transform or GCPs and the
class palette as colour table; `cog=True` turns it into a cloud-optimised GeoTIFF with overviews.
PNG/JPEG inputs give a grayscale PNG of class indices. Probabilities: uint8 (p * 255), one band per
class, nodata as an internal mask. Results arrive as rectangles (windows), in no particular order.

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
from typing import Sequence

import numpy as np

from bigseg.errors import OutputError, first_line
from bigseg.io.readers import Georef
from bigseg.tiling import Window

NODATA = 255
BLOCK = 512


def partial_path(path: Path) -> Path:
    """Temporary name beside `path`; keeps the suffix so format-sniffing writers still work."""
    return path.with_name(f".{path.stem}.partial{path.suffix}")


def _commit(tmp: Path, path: Path) -> None:
    os.replace(tmp, path)


def _remove(path: Path) -> None:
    try:
        path.unlink()
    except FileNotFoundError:
        pass


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

    resumable = True

    def __init__(self, path: Path, width: int, height: int, count: int, georef: Georef | None,
                 palette: Sequence[Sequence[int]] | None = None, tags: dict | None = None,
                 cog: bool = False, mask: bool = False, resume_rows: int = 0):
        import rasterio
        from rasterio.errors import NotGeoreferencedWarning

        self.path, self.cog, self.mask = path, cog, mask
        self.width, self.height, self.count = width, height, count
        self.tmp = partial_path(path)
        self.rows_written = 0
        self._bands: dict[int, list] = {}  # block row -> [data (count, h, W), valid (h, W) or None, pixels]
        self._done_bands: set[int] = set()
        if resume_rows:
            self._reopen_partial(resume_rows)
            return
        profile = dict(driver="GTiff", width=width, height=height, count=count, dtype="uint8",
                       tiled=True, blockxsize=BLOCK, blockysize=BLOCK, compress="deflate",
                       predictor=2 if mask else 1, BIGTIFF="IF_SAFER")
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
        top = max(window.row_off, self.rows_written)
        for band in range(top // BLOCK, (window.row_end - 1) // BLOCK + 1):
            b0, b1 = band * BLOCK, min((band + 1) * BLOCK, self.height)
            r0, r1 = max(top, b0), min(window.row_end, b1)
            if r0 >= r1 or band in self._done_bands:
                continue
            held = self._bands.get(band)
            if held is None:
                held = self._bands[band] = [np.zeros((self.count, b1 - b0, self.width), np.uint8),
                                            np.zeros((b1 - b0, self.width), bool) if self.mask else None, 0]
            rows_in = slice(r0 - window.row_off, r1 - window.row_off)
            held[0][:, r0 - b0:r1 - b0, window.col_off:window.col_end] = data[:, rows_in]
            if held[1] is not None and valid is not None:
                held[1][r0 - b0:r1 - b0, window.col_off:window.col_end] = valid[rows_in]
            held[2] += (r1 - r0) * window.width
            if held[2] >= (b1 - b0) * self.width:
                self._write_band(band)

    def _write_band(self, band: int) -> None:
        from rasterio.windows import Window as RWindow

        data, valid, _ = self._bands.pop(band)
        w = RWindow(0, band * BLOCK, self.width, data.shape[1])
        self.ds.write(data, window=w)
        if valid is not None:
            self.ds.write_mask((valid * 255).astype(np.uint8), window=w)
        self._done_bands.add(band)
        while self.rows_written < self.height and self.rows_written // BLOCK in self._done_bands:
            self.rows_written = min(self.height, self.rows_written + BLOCK)

    def sync(self) -> None:
        """Close and reopen: every finished block row is on disk (fsync'd, so that a journal
        written next never outlives the data after a power loss), with a valid TIFF directory."""
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
        self.ds.close()
        if self.cog:
            cog_tmp = self.tmp.with_name(self.tmp.name + ".cog.tif")
            try:
                rasterio.shutil.copy(self.tmp, cog_tmp, driver="COG", COMPRESS="DEFLATE",
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
            self.ds.close()
        finally:
            _remove(self.tmp)
            _remove(self.tmp.with_name(self.tmp.name + ".cog.tif"))


class PngWriter:
    """Grayscale PNG of class indices; PNG has no windows, so rows are gathered and encoded at the end
    (the input image is held whole by its reader anyway)."""

    resumable = False

    def __init__(self, path: Path, width: int, height: int):
        self.path, self.tmp = path, partial_path(path)
        self.array = np.full((height, width), NODATA, np.uint8)

    def write(self, window: Window, data: np.ndarray, valid: np.ndarray | None = None) -> None:
        self.array[window.slices] = data

    def commit(self) -> Path:
        import cv2

        try:
            ok = cv2.imwrite(str(self.tmp), self.array)
        except cv2.error as e:
            ok = False
            reason = str(e)
        else:
            reason = "encoder refused"
        if not ok:
            _remove(self.tmp)
            raise OutputError(f"cannot write {self.path}: {reason}")
        _commit(self.tmp, self.path)
        return self.path

    def abort(self) -> None:
        _remove(self.tmp)


class OverlayWriter:
    """A colour preview of the mask blended over the image, at most `max_side` pixels on the long
    side: rows and columns are sampled as rectangles of the mask arrive, so memory stays bounded.
    Resumable: a resumed job replays the finished rows from the partial mask."""

    resumable = True

    def __init__(self, path: Path, width: int, height: int, palette, max_side: int = 2048, alpha: float = 0.5):
        f = max(width, height) / max_side if max(width, height) > max_side else 1.0
        self.rows = np.minimum((np.arange(int(round(height / f))) * f + f / 2).astype(np.int64), height - 1)
        self.cols = np.minimum((np.arange(int(round(width / f))) * f + f / 2).astype(np.int64), width - 1)
        self.preview = np.zeros((len(self.rows), len(self.cols), 3), np.uint8)
        lut = np.zeros((256, 3), np.float32)
        lut[:len(palette[:NODATA])] = np.asarray(palette[:NODATA], np.float32)[:, :3]
        self.lut, self.alpha = lut, alpha
        self.path, self.tmp = path, partial_path(path)

    def rows_in(self, window: Window) -> np.ndarray:
        """Image rows (absolute) the preview samples inside `window`."""
        return np.unique(self.rows[(self.rows >= window.row_off) & (self.rows < window.row_end)])

    def write(self, window: Window, labels: np.ndarray, image_rows: dict[int, np.ndarray]) -> None:
        """`image_rows`: for each row from `rows_in`, that row's (3, window.width) image values."""
        pi = np.nonzero((self.rows >= window.row_off) & (self.rows < window.row_end))[0]
        pj = np.nonzero((self.cols >= window.col_off) & (self.cols < window.col_end))[0]
        if not len(pi) or not len(pj):
            return
        cols = self.cols[pj] - window.col_off
        for i in pi:
            r = self.rows[i]
            lab = labels[r - window.row_off, cols]
            img = np.moveaxis(image_rows[r][:, cols], 0, -1)
            blend = np.where((lab == NODATA)[:, None], img, (1 - self.alpha) * img + self.alpha * self.lut[lab])
            self.preview[i, pj] = np.clip(blend, 0, 255).astype(np.uint8)

    def commit(self) -> Path:
        import cv2

        if not cv2.imwrite(str(self.tmp), self.preview[..., ::-1]):
            _remove(self.tmp)
            raise OutputError(f"cannot write {self.path}")
        _commit(self.tmp, self.path)
        return self.path

    def abort(self) -> None:
        _remove(self.tmp)
