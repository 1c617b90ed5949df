"""An area of interest: `--bbox minx,miny,maxx,maxy` (in the raster's CRS, or in `--bbox-crs`) or
`--aoi FILE` (polygons of any vector file pyogrio reads, reprojected as needed). The input is then
read as the window of the area's extent on its own grid (`ClippedReader`): only tiles that touch the
area are read and predicted, the outputs cover that extent (their transform moved to its corner),
and pixels outside the polygons are nodata. Time and memory follow the area, not the scene.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from bigseg.errors import InputError, first_line
from bigseg.tiling.geometry import Georef, Window


@dataclass(frozen=True)
class AreaOptions:
    """`bbox` (minx, miny, maxx, maxy) in `bbox_crs` (None: the raster's CRS); `aoi`: a vector file
    whose polygons (all layers' features, or `layer`'s) bound the prediction."""

    bbox: tuple[float, float, float, float] | None = None
    bbox_crs: str | None = None
    aoi: str | None = None
    layer: str | None = None

    def __post_init__(self):
        if self.bbox is not None:
            minx, miny, maxx, maxy = self.bbox
            if not (minx < maxx and miny < maxy) or not all(map(math.isfinite, self.bbox)):
                raise InputError(f"must be minx,miny,maxx,maxy with min < max, got {','.join(map(str, self.bbox))}",
                                 param="bbox")
        if self.bbox is not None and self.aoi is not None:
            raise InputError("and --aoi both give an area of interest; give one", param="bbox")
        if self.bbox_crs is not None and self.bbox is None:
            raise InputError("needs --bbox", param="bbox_crs")

    @property
    def given(self) -> bool:
        return self.bbox is not None or self.aoi is not None

    def describe(self) -> str:
        if self.bbox is not None:
            return f"the bbox {','.join(f'{v:g}' for v in self.bbox)}" + (f" ({self.bbox_crs})" if self.bbox_crs else "")
        return f"the area of interest in {Path(self.aoi).name}"


def parse_bbox(text: str | None) -> tuple[float, float, float, float] | None:
    if text is None:
        return None
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        values = ()
    if len(values) != 4:
        raise InputError(f"takes minx,miny,maxx,maxy (four numbers), got {text!r}", param="bbox")
    return values


def area_geometry(options: AreaOptions, georef: Georef | None, name: str):
    """The area as one shapely geometry in the raster's CRS (None without an area)."""
    import shapely

    if not options.given:
        return None
    if georef is None or not georef.mapped:
        raise InputError(f"{name} has no georeferencing (CRS and transform): an area of interest needs "
                         f"map coordinates; crop the image first")
    if options.bbox is not None:
        geometry = shapely.box(*options.bbox)
        source_crs = options.bbox_crs
    else:
        geometry, source_crs = _read_polygons(options.aoi, options.layer)
    if source_crs is not None:
        geometry = _reproject(geometry, source_crs, georef.crs)
    return geometry


def _read_polygons(path: str, layer: str | None):
    """The union of a vector file's polygons and its CRS (WKT), read with pyogrio."""
    import pyogrio
    import shapely

    if not Path(path).exists() and "://" not in path:
        raise InputError(f"area of interest not found: {path}", param="aoi")
    try:
        meta, _, wkb, _ = pyogrio.raw.read(path, layer=layer, read_geometry=True, columns=[])
    except Exception as e:  # pyogrio's and GDAL's own error types
        raise InputError(f"{path}: not a readable vector file ({first_line(e)})", param="aoi") from None
    polygons = [g for g in shapely.from_wkb(wkb) if g is not None and g.geom_type in ("Polygon", "MultiPolygon")]
    if not polygons:
        raise InputError(f"{path} holds no polygons (an area of interest is one or more polygons)", param="aoi")
    return shapely.make_valid(shapely.union_all(polygons)), meta.get("crs")


def _reproject(geometry, source: Any, target: Any):
    """`geometry` from CRS `source` to `target`, its edges densified first so that they bend as the
    projection bends them."""
    import shapely
    from pyproj import CRS, Transformer

    try:
        src = CRS.from_user_input(source)
    except Exception as e:  # pyproj's CRSError
        raise InputError(f"is not a CRS pyproj knows ({first_line(e)}); e.g. EPSG:4326", param="bbox_crs") from None
    dst = CRS.from_user_input(target.to_wkt() if hasattr(target, "to_wkt") else target)
    if src == dst:
        return geometry
    minx, miny, maxx, maxy = geometry.bounds
    geometry = shapely.segmentize(geometry, max(maxx - minx, maxy - miny) / 64 or 1e-9)
    transform = Transformer.from_crs(src, dst, always_xy=True)
    return shapely.transform(geometry, lambda xy: np.column_stack(transform.transform(xy[:, 0], xy[:, 1])))


class ClippedReader:
    """`reader` seen through the window of `geometry`'s extent on its grid: reads, validity and
    georeference in that window's frame; pixels outside `geometry` invalid; windows that miss it
    empty (never read)."""

    def __init__(self, reader, geometry, note: str):
        import shapely
        from rasterio.windows import from_bounds

        self.inner, self.geometry = reader, geometry
        t = reader.georef.transform
        full = Window(0, 0, reader.width, reader.height)
        w = from_bounds(*geometry.bounds, transform=t)
        eps = 1e-6  # pixels: a reprojected edge that lies on a pixel edge stays there
        col0, row0 = max(0, math.floor(w.col_off + eps)), max(0, math.floor(w.row_off + eps))
        col1 = min(reader.width, math.ceil(w.col_off + w.width - eps))
        row1 = min(reader.height, math.ceil(w.row_off + w.height - eps))
        if col1 <= col0 or row1 <= row0:
            raise InputError(f"{reader.path}: the area of interest does not overlap the image "
                             f"(bounds {_bounds_text(geometry.bounds)}; the image's {_bounds_text(_image_bounds(reader))})")
        self.offset = Window(col0, row0, col1 - col0, row1 - row0)
        self.width, self.height = self.offset.width, self.offset.height
        g = reader.georef
        self.georef = Georef(g.crs, t * t.translation(col0, row0))
        self.whole = shapely.box(*geometry.bounds).equals(geometry) or geometry.contains(
            shapely.box(*_window_bounds(self.georef.transform, Window(0, 0, self.width, self.height))))
        shapely.prepare(geometry)
        self.notes = list(reader.notes) + [note + f": {self.width}x{self.height} of {full.width}x{full.height} pixels"]

    def __getattr__(self, name: str) -> Any:  # path, dtype, plan, kind, scale, channels, close
        return getattr(self.inner, name)

    def _shift(self, window: Window) -> Window:
        return Window(window.col_off + self.offset.col_off, window.row_off + self.offset.row_off,
                      window.width, window.height)

    def empty(self, window: Window) -> bool:
        import shapely

        if self.inner.empty(self._shift(window)):
            return True
        return not self.whole and not shapely.intersects(
            self.geometry, shapely.box(*_window_bounds(self.georef.transform, window)))

    def read(self, window: Window) -> tuple[np.ndarray, np.ndarray]:
        data, valid = self.inner.read(self._shift(window))
        return data, valid & self._inside(window)

    def validity(self, window: Window) -> np.ndarray:
        return self.inner.validity(self._shift(window)) & self._inside(window)

    def _inside(self, window: Window) -> np.ndarray | bool:
        if self.whole:
            return True
        from rasterio.features import geometry_mask
        from rasterio.windows import Window as RWindow
        from rasterio.windows import transform as window_transform

        t = window_transform(RWindow(window.col_off, window.row_off, window.width, window.height),
                             self.georef.transform)
        return geometry_mask([self.geometry], (window.height, window.width), t, invert=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.inner.close()


def _window_bounds(transform, window: Window) -> tuple[float, float, float, float]:
    xs, ys = zip(*(transform * (c, r) for c in (window.col_off, window.col_end) for r in (window.row_off, window.row_end)))
    return min(xs), min(ys), max(xs), max(ys)


def _image_bounds(reader) -> tuple[float, float, float, float]:
    return _window_bounds(reader.georef.transform, Window(0, 0, reader.width, reader.height))


def _bounds_text(bounds) -> str:
    return ", ".join(f"{v:.6g}" for v in bounds)
