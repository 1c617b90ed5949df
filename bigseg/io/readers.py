"""Readers: open any raster once, then read windows of model-ready bands and their validity.

rasterio (GDAL) for GeoTIFF/BigTIFF/COG and anything GDAL opens; tifffile for OME-TIFF and
scanner/microscope TIFFs (decoding only the tiles or strips a window touches); OpenCV for PNG/JPEG.
Every reader returns (channels, h, w) float32 in the model's 0..255 range and a boolean validity
mask: nodata values, alpha bands, internal/external masks and NaN all become `False`.
"""
from __future__ import annotations

import logging
import math
import threading
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from bigseg.errors import InputError, RasterFormatError, first_line
from bigseg.tiling.geometry import Georef, Window
from bigseg.io import bands as B
from bigseg.io import exif
from bigseg.io.remote import RemotePath, is_remote, remote_failure

CHECK_PIXELS = 64e6  # 8-bit rasters up to this size are sampled at opening only to find damaged blocks early
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".webp"}
RASTER_SUFFIXES = {".tif", ".tiff", ".vrt", ".img", ".jp2", ".ntf", ".gtif"}


@dataclass(frozen=True)
class ReadOptions:
    """How a raster becomes model input: 1-based `bands` in order, a fixed `value_range` for
    non-8-bit data, the reader `engine` (auto, gdal, tifffile or opencv), an `area` of interest
    (`bigseg.io.area`: only its extent is read, pixels outside it are nodata), the `asset` a
    STAC item input stands for, and the ground pixel size it is read at (`resolution`) with the
    grid its outputs are written on (`output_grid`)."""

    bands: tuple[int, ...] | None = None
    value_range: tuple[float, float] | None = None
    engine: str = "auto"
    area: Any = None  # AreaOptions
    asset: str | None = None  # the asset of a STAC item input (`bigseg.io.stac`)
    resolution: str | float = "model"  # model, native or a ground pixel size (`bigseg.run.inputs`)
    output_grid: str = "input"  # the grid of a resampled job's outputs: input or model

    def __post_init__(self):
        if self.resolution not in ("model", "native") and self.engine not in ("auto", "gdal"):
            raise InputError(f"{self.engine} reads at the file's own resolution; --resolution resamples through "
                             f"GDAL (--reader gdal)", param="reader")



@dataclass
class Reader:
    path: Path
    width: int
    height: int
    dtype: np.dtype
    plan: B.BandPlan
    kind: str  # "raster" (GeoTIFF-like output) or "image" (PNG output)
    georef: Georef | None = None
    notes: list[str] = field(default_factory=list)
    scale: Any = None
    resampled: str | None = None  # read at another pixel size than the file's: the note that says so
    native_size: tuple[int, int] | None = None  # then the file's own width and height (within an area of interest)

    @property
    def channels(self) -> int:
        return self.plan.channels

    def read(self, window: Window) -> tuple[np.ndarray, np.ndarray]:
        """(bands, h, w) float32 in 0..255 and the validity mask; safe to call from a reading thread
        while another thread reads too (one file handle, reads serialised)."""
        with self._lock:
            data, valid = self._read_raw(window)
        data = B.rescale(B.apply_plan(self.plan, data), self.scale)
        valid &= np.isfinite(data).all(0)
        return data, valid

    def validity(self, window: Window) -> np.ndarray:
        """The validity mask of `window` alone, without the bands where the format allows (a
        label's statistics need where the image has data, not its pixels)."""
        return self.read(window)[1]

    def empty(self, window: Window) -> bool:
        """True when `window` certainly holds no valid pixel, known without decoding anything
        (False when that cannot be known cheaply: then `read` tells)."""
        return False

    def identity(self) -> dict[str, Any]:
        """What identifies the input's content for a resumed job: a local file's path, size and
        modification time."""
        st = Path(self.path).stat()
        return {"input": str(Path(self.path).resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns}

    @property
    def _lock(self) -> threading.Lock:
        lock = self.__dict__.get("_read_lock")
        if lock is None:
            lock = self.__dict__.setdefault("_read_lock", threading.Lock())
        return lock

    def _read_raw(self, window: Window) -> tuple[np.ndarray, np.ndarray]:  # pragma: no cover
        raise NotImplementedError

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _finite(data: np.ndarray) -> np.ndarray:
    if np.issubdtype(data.dtype, np.floating):
        return np.isfinite(data).all(0)
    return np.ones(data.shape[1:], bool)


class GdalReader(Reader):
    """Any raster GDAL opens, read in windows. `pixel_size`: seen on a grid of that ground pixel
    size instead (the same CRS, origin and extent), resampled on the fly by GDAL's warper: averaged
    when coarser (through the file's overviews where it has them), bilinear when finer."""

    def __init__(self, path: Path, wanted: int, bands: tuple[int, ...] | None,
                 value_range: tuple[float, float] | None, pixel_size: float | None = None):
        import rasterio
        from rasterio.errors import NotGeoreferencedWarning

        self.source = None  # the file itself, when `ds` is a resampling view of it
        try:
            with warnings.catch_warnings():  # a plain TIFF is a fine input; its output has no georeference either
                warnings.simplefilter("ignore", NotGeoreferencedWarning)
                self.ds = rasterio.open(str(path))
        except rasterio.errors.RasterioIOError as e:
            if isinstance(path, RemotePath):
                raise RasterFormatError(remote_failure(path, e)) from None
            raise RasterFormatError(f"{path}: not a readable raster ({first_line(e)})") from None
        try:
            if pixel_size is not None:
                self.source, self.ds = self.ds, resampled_view(self.ds, pixel_size)
            self._describe(path, wanted, bands, value_range)
        except BaseException:
            self.close()
            raise

    def empty(self, window: Window) -> bool:
        """A sparse GeoTIFF stores no block where nothing was written; GDAL reads such blocks as
        the nodata value (or alpha 0), i.e. invalid. A window all of whose blocks of the bands that
        decide validity are absent holds no valid pixel, and is skipped without a read."""
        if self._present is None:
            return False
        (bh, bw), present = self._block_shape, self._present
        i0, i1 = window.row_off // bh, (window.row_end - 1) // bh + 1
        j0, j1 = window.col_off // bw, (window.col_end - 1) // bw + 1
        # blocks present in the window, from the summed-area table: O(1) per window
        return present[i1, j1] - present[i0, j1] - present[i1, j0] + present[i0, j0] == 0

    def identity(self) -> dict[str, Any]:
        """A remote file's identity: its URL, grid, bands and the digest of its first block (one
        small range request): a file replaced since an interrupted job is then not resumed into."""
        if not isinstance(self.path, RemotePath):
            return super().identity()
        import hashlib

        from rasterio.windows import Window as RWindow

        ds = self.ds
        bh, bw = ds.block_shapes[0]
        with self._lock:
            first = ds.read(1, window=RWindow(0, 0, min(bw, ds.width), min(bh, ds.height)))
        return {"input": str(self.path), "size": [ds.width, ds.height, ds.count], "dtypes": list(ds.dtypes),
                "transform": list(ds.transform)[:6], "crs": str(ds.crs), "first_block": hashlib.sha256(first).hexdigest()}

    def _sparse_map(self, path: Path, alpha: int | None) -> None:
        """Which blocks of the bands that decide validity are present in the file (the TIFF's
        block byte counts, read once with tifffile), when absent blocks read as invalid: the alpha
        band's, or every band's when each has a nodata value. Otherwise (absent blocks would read
        as valid zeros, or the file is not a plain tiled GeoTIFF) `empty` is always False."""
        from rasterio.enums import MaskFlags

        self._present = None
        ds = self.ds
        if ds.driver != "GTiff" or isinstance(path, RemotePath):  # the block map is read locally only
            return
        if alpha is not None:
            bands = [alpha]
        elif all(MaskFlags.nodata in ds.mask_flag_enums[b - 1] for b in self.plan.indexes):
            bands = list(self.plan.indexes)
        else:
            return
        log = logging.getLogger("tifffile")
        level = log.level
        log.setLevel(logging.CRITICAL)  # its opinions on GDAL's own tags are not the user's business
        try:
            import tifffile

            with tifffile.TiffFile(path) as tif:
                page = tif.pages.first
                if not page.is_tiled or (page.imagewidth, page.imagelength) != (ds.width, ds.height):
                    return
                shape = (-(-page.imagelength // page.tilelength), -(-page.imagewidth // page.tilewidth))
                counts = np.asarray(page.databytecounts, np.int64)
        except Exception:  # anything tifffile cannot read simply gets no shortcut
            return
        finally:
            log.setLevel(level)
        if page.planarconfig == 2:  # one plane of blocks per band
            counts = counts.reshape(-1, *shape)[[b - 1 for b in bands]].max(0)
        present = (counts.reshape(shape) > 0).astype(np.int64)
        table = np.zeros((shape[0] + 1, shape[1] + 1), np.int64)
        table[1:, 1:] = present.cumsum(0).cumsum(1)
        self._present, self._block_shape = table, (page.tilelength, page.tilewidth)

    def _describe(self, path, wanted, bands, value_range) -> None:
        from rasterio.enums import ColorInterp

        ds = self.ds
        interp = list(ds.colorinterp)
        alpha = interp.index(ColorInterp.alpha) + 1 if ColorInterp.alpha in interp else None
        palette = None
        if ds.count == 1 and interp[0] == ColorInterp.palette:
            cmap = ds.colormap(1)
            palette = np.zeros((max(cmap) + 1, 4), np.uint8)
            for k, v in cmap.items():
                palette[k] = v
        rgb = None
        if all(c in interp for c in (ColorInterp.red, ColorInterp.green, ColorInterp.blue)):
            rgb = tuple(interp.index(c) + 1 for c in (ColorInterp.red, ColorInterp.green, ColorInterp.blue))
        plan = B.plan_bands(path.name, ds.count, alpha, palette, wanted, bands, rgb)
        georef = Georef.of(ds)
        super().__init__(path, ds.width, ds.height, np.dtype(ds.dtypes[plan.indexes[0] - 1]), plan,
                         "raster", georef, list(plan.notes))
        self._sparse_map(path, alpha)
        # 8-bit data is used as is: the sample that gives other types their rescaling is then read
        # only as an early decode check of rasters small enough for that to be cheap
        needs_sample = self.dtype != np.uint8 or value_range is not None or ds.width * ds.height <= CHECK_PIXELS
        if palette is None and needs_sample:
            try:
                self.scale = B.value_scale(self.dtype, *self._sample(), value_range)
            except Exception as e:  # a file whose header opens but whose pixels do not decode
                raise RasterFormatError(f"{path}: pixels cannot be decoded ({first_line(e)})") from None

    def _sample(self) -> tuple[np.ndarray, np.ndarray]:
        from rasterio.enums import Resampling

        f = max(1, -(-max(self.width, self.height) // B.SAMPLE_SIDE))
        shape = (max(1, self.height // f), max(1, self.width // f))
        data = self.ds.read(list(self.plan.indexes), out_shape=(len(self.plan.indexes), *shape),
                            resampling=Resampling.nearest)
        valid = self.ds.dataset_mask(out_shape=shape, resampling=Resampling.nearest) > 0
        return data, valid & _finite(data)

    def validity(self, window: Window) -> np.ndarray:
        """GDAL's dataset mask (nodata, alpha, internal or external mask); float bands are read
        too, for their NaNs. A raster without any mask decodes nothing here."""
        if np.issubdtype(self.dtype, np.floating):
            return self.read(window)[1]
        from rasterio.windows import Window as RWindow

        w = RWindow(window.col_off, window.row_off, window.width, window.height)
        with self._lock:
            try:
                return self.ds.dataset_mask(window=w) > 0
            except Exception as e:
                raise RasterFormatError(f"{self.path}: cannot decode the mask at rows {window.row_off}.."
                                        f"{window.row_end} ({first_line(e)})") from None

    def _read_raw(self, window: Window) -> tuple[np.ndarray, np.ndarray]:
        from rasterio.windows import Window as RWindow

        w = RWindow(window.col_off, window.row_off, window.width, window.height)
        try:
            data = self.ds.read(list(self.plan.indexes), window=w)
            valid = self.ds.dataset_mask(window=w) > 0
        except Exception as e:  # GDAL decode errors surface as several rasterio types
            raise RasterFormatError(f"{self.path}: cannot decode pixels at rows {window.row_off}.."
                                    f"{window.row_end} ({first_line(e)})") from None
        return data, valid & _finite(data)

    def close(self) -> None:
        overview = getattr(self.ds, "src_dataset", None) if self.source is not None else None
        self.ds.close()
        if self.source is not None:
            self.source.close()
        if overview is not None and overview is not self.source:
            overview.close()


def resampled_view(ds, pixel_size: float, resampling: str | None = None):
    """`ds` on a grid of `pixel_size` (in its CRS's units; the same origin, the extent rounded up to
    whole pixels) as a GDAL warped VRT: average when coarser, bilinear when finer (or `resampling`).
    A coarser grid is warped from the finest of the file's overviews that is not coarser than it
    (as gdalwarp does), so a remote COG is fetched at about the size asked for; the view's
    `src_dataset` is then that overview, for the caller to close with the view."""
    import rasterio
    from rasterio.enums import Resampling
    from rasterio.vrt import WarpedVRT

    t = ds.transform
    factor = pixel_size / abs(t.a)
    width, height = max(1, math.ceil(ds.width / factor - 1e-9)), max(1, math.ceil(ds.height / factor - 1e-9))
    how = Resampling[resampling] if resampling else (Resampling.average if factor > 1 else Resampling.bilinear)
    source, level = ds, None
    for i, f in enumerate(ds.overviews(1) if factor > 1 else []):
        if f <= factor * (1 + 1e-6):
            level = i
    if level is not None:
        source = rasterio.open(ds.name, OVERVIEW_LEVEL=level)
    from rasterio.enums import ColorInterp

    # a per-dataset mask (internal or external) becomes an alpha band of the view; an alpha band or
    # nodata values are carried by the warper as they are
    alpha = (source.nodata is None and ColorInterp.alpha not in source.colorinterp
             and any(f.name == "per_dataset" for f in source.mask_flag_enums[0]))
    return WarpedVRT(source, crs=ds.crs, transform=t * t.scale(factor), width=width, height=height,
                     resampling=how, add_alpha=alpha)


class TiffFileReader(Reader):
    """Windowed reading with tifffile: decodes only the segments (tiles or strips) a window touches."""

    def __init__(self, path: Path, wanted: int, bands: tuple[int, ...] | None,
                 value_range: tuple[float, float] | None):
        import tifffile

        try:
            self.tif = tifffile.TiffFile(path)
            self.page = self.tif.pages.first  # full resolution of the first series (OME-TIFF level 0)
        except Exception as e:  # tifffile raises several types for broken files
            raise RasterFormatError(f"{path}: not a readable TIFF ({first_line(e)})") from None
        p = self.page
        if p.planarconfig != 1 and p.samplesperpixel > 1:
            raise RasterFormatError(f"{path}: band-separate (planar) TIFFs are read through GDAL only")
        self.samples = p.samplesperpixel
        self.seg_h = p.tilelength if p.is_tiled else p.rowsperstrip
        self.seg_w = p.tilewidth if p.is_tiled else p.imagewidth
        self.across = -(-p.imagewidth // self.seg_w)
        alpha = self.samples if self.samples in (2, 4) and p.extrasamples else None
        plan = B.plan_bands(path.name, self.samples, alpha, None, wanted, bands)
        self.alpha = alpha
        super().__init__(path, p.imagewidth, p.imagelength, np.dtype(p.dtype), plan, "raster", None,
                         list(plan.notes))
        self.scale = B.value_scale(self.dtype, *self._sample(), value_range)

    def _segments(self, window: Window) -> np.ndarray:
        """(h, w, samples) pixels of `window`, decoding each needed segment once."""
        out = np.zeros((window.height, window.width, self.samples), self.dtype)
        fh = self.tif.filehandle
        for sy in range(window.row_off // self.seg_h, (window.row_end - 1) // self.seg_h + 1):
            for sx in range(window.col_off // self.seg_w, (window.col_end - 1) // self.seg_w + 1):
                index = sy * self.across + sx
                fh.seek(self.page.dataoffsets[index])
                raw = fh.read(self.page.databytecounts[index])
                seg, _, _ = self.page.decode(raw, index, jpegtables=self.page.jpegtables)
                seg = seg.reshape(seg.shape[-3:])
                y0, x0 = sy * self.seg_h, sx * self.seg_w
                ys = slice(max(window.row_off, y0), min(window.row_end, y0 + seg.shape[0]))
                xs = slice(max(window.col_off, x0), min(window.col_end, x0 + seg.shape[1]))
                out[ys.start - window.row_off:ys.stop - window.row_off,
                    xs.start - window.col_off:xs.stop - window.col_off] = \
                    seg[ys.start - y0:ys.stop - y0, xs.start - x0:xs.stop - x0]
        return out

    def _read_raw(self, window: Window) -> tuple[np.ndarray, np.ndarray]:
        try:
            pixels = np.moveaxis(self._segments(window), -1, 0)
        except Exception as e:
            raise RasterFormatError(f"{self.path}: cannot decode pixels ({first_line(e)})") from None
        data = pixels[[b - 1 for b in self.plan.indexes]]
        valid = pixels[self.alpha - 1] > 0 if self.alpha else np.ones(data.shape[1:], bool)
        return data, valid & _finite(data)

    def _sample(self) -> tuple[np.ndarray, np.ndarray]:
        step = max(1, -(-max(self.width, self.height) // B.SAMPLE_SIDE))
        rows = [self._read_raw(Window(0, r, self.width, 1)) for r in range(0, self.height, step)]
        data = np.concatenate([d[:, :, ::step] for d, _ in rows], 1)
        valid = np.concatenate([v[:, ::step] for _, v in rows], 0)
        return data, valid

    def close(self) -> None:
        self.tif.close()


class OpenCVReader(Reader):
    """PNG/JPEG through OpenCV: decoded whole (these formats have no windows), RGB order."""

    def __init__(self, path: Path, wanted: int, bands: tuple[int, ...] | None,
                 value_range: tuple[float, float] | None):
        import cv2

        image = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
        if image is None:
            raise RasterFormatError(f"{path}: not a readable image (OpenCV could not decode it)")
        turn = exif.orientation(path)  # as stored -> as every viewer shows it (IMREAD_UNCHANGED ignores EXIF)
        image = exif.apply(image, turn)
        image = image[..., None] if image.ndim == 2 else image
        if image.shape[2] >= 3:  # OpenCV is BGR(A)
            image = image[..., [2, 1, 0, *range(3, image.shape[2])]]
        self.image = np.moveaxis(image, -1, 0)
        count = self.image.shape[0]
        alpha = 4 if count == 4 else (2 if count == 2 else None)
        rgb = (1, 2, 3) if count >= 3 else None
        plan = B.plan_bands(path.name, count, alpha, None, wanted, bands, rgb if bands is None else None)
        self.alpha = alpha
        notes = list(plan.notes) + ([f"EXIF orientation {turn}: {exif.TURNS[turn]} as viewers show it; the mask "
                                     f"matches the image as displayed"] if turn != 1 else [])
        super().__init__(path, self.image.shape[2], self.image.shape[1], self.image.dtype, plan, "image", None, notes)
        step = max(1, -(-max(self.width, self.height) // B.SAMPLE_SIDE))
        sample, valid = self._read_raw(Window(0, 0, self.width, self.height))
        self.scale = B.value_scale(self.dtype, sample[:, ::step, ::step], valid[::step, ::step], value_range)

    def _read_raw(self, window: Window) -> tuple[np.ndarray, np.ndarray]:
        rows, cols = window.slices
        data = self.image[[b - 1 for b in self.plan.indexes], rows, cols]
        valid = self.image[self.alpha - 1, rows, cols] > 0 if self.alpha else np.ones(data.shape[1:], bool)
        return data, valid & _finite(data)


def open_raster(path: str | Path, wanted_bands: int = 3, bands: tuple[int, ...] | None = None,
                value_range: tuple[float, float] | None = None, engine: str = "auto") -> Reader:
    """Open `path` with the right reader. `engine`: auto, gdal, tifffile or opencv."""
    if is_remote(path):
        if engine not in ("auto", "gdal"):
            raise InputError(f"reads local files; {path} is remote, read by GDAL (--reader gdal)", param="reader")
        return GdalReader(RemotePath(str(path)), wanted_bands, bands, value_range)
    path = Path(path)
    if not path.exists():
        raise InputError(f"input not found: {path}")
    if path.is_dir():
        raise InputError(f"{path} is a folder; pass image files, a folder with --recursive, or a glob")
    if path.stat().st_size == 0:
        raise RasterFormatError(f"{path}: empty file (0 bytes)")
    suffix = path.suffix.lower()
    if engine == "auto":
        name = path.name.lower()
        engine = ("opencv" if suffix in IMAGE_SUFFIXES else
                  "tifffile" if name.endswith((".ome.tif", ".ome.tiff")) else "gdal")
    readers = {"gdal": GdalReader, "tifffile": TiffFileReader, "opencv": OpenCVReader}
    if engine not in readers:
        raise InputError(f"unknown reader {engine!r}; use auto, gdal, tifffile or opencv")
    if engine == "opencv" and beyond_opencv(path):
        # OpenCV refuses images over its pixel limit (CV_IO_MAX_IMAGE_PIXELS): GDAL reads them in windows
        reader = GdalReader(path, wanted_bands, bands, value_range)
        reader.notes.append(f"{reader.width}x{reader.height} is over OpenCV's limit of {opencv_pixel_limit()} "
                            f"pixels: read in windows through GDAL")
        return reader
    return readers[engine](path, wanted_bands, bands, value_range)


def opencv_pixel_limit() -> int:
    """The largest image OpenCV decodes (its CV_IO_MAX_IMAGE_PIXELS, 2^30 unless set)."""
    import os

    try:
        return int(os.environ.get("CV_IO_MAX_IMAGE_PIXELS", 1 << 30))
    except ValueError:
        return 1 << 30


def beyond_opencv(path: Path) -> bool:
    """Whether the image's header claims more pixels than OpenCV will decode (a PNG's or JPEG's
    header read here; other formats' by GDAL, which decodes nothing at opening)."""
    size = exif.header_size(path)
    if size is not None:
        return size[0] * size[1] > opencv_pixel_limit()
    import rasterio
    from rasterio.errors import NotGeoreferencedWarning

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", NotGeoreferencedWarning)
            with rasterio.open(path) as ds:
                return ds.width * ds.height > opencv_pixel_limit()
    except Exception:  # not GDAL's to open: OpenCV says what it is
        return False


def open_input(path: str | Path, wanted_bands: int, options: ReadOptions, pixel_size: float | None = None) -> Reader:
    """`open_raster` with a job's read options (with `pixel_size`: resampled to it by GDAL), seen
    through its area of interest if any."""
    if pixel_size is not None:  # GDAL's warper resamples (ReadOptions refuses another reader with a size)
        reader = GdalReader(RemotePath(str(path)) if is_remote(path) else Path(path), wanted_bands, options.bands,
                            options.value_range, pixel_size)
    else:
        reader = open_raster(path, wanted_bands, options.bands, options.value_range, options.engine)
    if options.area is None or not options.area.given:
        return reader
    from bigseg.io.area import ClippedReader, area_geometry

    try:
        return ClippedReader(reader, area_geometry(options.area, reader.georef, str(path)), options.area.describe())
    except BaseException:
        reader.close()
        raise
