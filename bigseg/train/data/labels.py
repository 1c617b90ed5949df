"""Label sources of a raster scene, each read window by window on the image's pixel grid:

- a label raster on the same grid (read as stored), or on another grid or CRS (warped onto the
  image's grid per window by GDAL, nearest neighbour, through a WarpedVRT);
- a vector layer of labelled polygons (GeoPackage, Shapefile, GeoJSON, read with pyogrio),
  reprojected to the image's CRS once, indexed (shapely's STR-tree) and rasterised per window
  (rasterio, pixel-centre rule, so windows tile to the whole-raster rasterisation exactly);
- an area of interest: polygons outside which nothing is labelled.

Each returns raw label values plus a mask of where they exist; the scene maps values to classes.
"""
from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from bigseg.errors import DatasetError, first_line
from bigseg.tiling.geometry import Window

VECTOR_SUFFIXES = {".gpkg", ".shp", ".geojson", ".json", ".fgb", ".gml", ".kml", ".sqlite"}
GRID_TOLERANCE = 1e-6  # relative difference of two transforms still called the same grid


@dataclass
class Grid:
    """The image's pixel grid: size, CRS and affine transform (None: pixel coordinates only)."""

    width: int
    height: int
    crs: Any = None
    transform: Any = None

    @property
    def georeferenced(self) -> bool:
        return self.crs is not None and self.transform is not None

    def window_transform(self, window: Window):
        from rasterio.transform import Affine
        from rasterio.windows import Window as RWindow
        from rasterio.windows import transform

        base = self.transform if self.transform is not None else Affine.identity()
        return transform(RWindow(window.col_off, window.row_off, window.width, window.height), base)

    def bounds(self) -> tuple[float, float, float, float]:
        """(left, bottom, right, top) in the grid's coordinates."""
        from rasterio.transform import Affine, array_bounds

        t = self.transform if self.transform is not None else Affine.identity()
        west, south, east, north = array_bounds(self.height, self.width, t)
        return min(west, east), min(south, north), max(west, east), max(south, north)


def _open(path: Path):
    import rasterio
    from rasterio.errors import NotGeoreferencedWarning

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", NotGeoreferencedWarning)
            return rasterio.open(path)
    except rasterio.errors.RasterioIOError as e:
        raise DatasetError(f"{path}: not a readable label raster ({first_line(e)})") from None


def _same_grid(ds, grid: Grid) -> bool:
    if (ds.width, ds.height) != (grid.width, grid.height):
        return False
    if not grid.georeferenced and ds.crs is None:
        return True
    if ds.crs != grid.crs:
        return False
    scale = max(abs(grid.transform.a), abs(grid.transform.e))
    return all(abs(a - b) <= GRID_TOLERANCE * scale for a, b in zip(ds.transform, grid.transform))


class RasterLabels:
    """Band 1 of a label raster, on the image's grid. Opened lazily (in each data worker)."""

    def __init__(self, path: Path, grid: Grid):
        self.path, self.grid = Path(path), grid
        with _open(self.path) as ds:
            self.dtype, self.nodata = np.dtype(ds.dtypes[0]), ds.nodata
            self.colormap = _colormap(ds)
            self.same_grid = _same_grid(ds, grid)
            if not self.same_grid:
                self._check_warpable(ds)
        self._ds = self._vrt = None
        self._pid = os.getpid()

    def _check_warpable(self, ds) -> None:
        g = self.grid
        if not g.georeferenced or ds.crs is None:
            raise DatasetError(f"{self.path}: the label raster is {ds.width}x{ds.height} and its image "
                               f"{g.width}x{g.height}, and without georeferencing on both they cannot be "
                               f"aligned; give the labels the image's size or georeference both")
        from rasterio.warp import transform_bounds

        left, bottom, right, top = transform_bounds(ds.crs, g.crs, *ds.bounds, densify_pts=21)
        gl, gb, gr, gt = g.bounds()
        if left >= gr or right <= gl or bottom >= gt or top <= gb:
            raise DatasetError(f"{self.path}: the label raster does not overlap its image (labels cover "
                               f"{left:.6g},{bottom:.6g} to {right:.6g},{top:.6g} in the image's CRS, the image "
                               f"{gl:.6g},{gb:.6g} to {gr:.6g},{gt:.6g})")

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_ds": None, "_vrt": None}

    def _source(self):
        if self._pid != os.getpid():  # forked into a data worker: open its own (see SceneSource.reader)
            self._ds = self._vrt = None
            self._pid = os.getpid()
        if self._ds is None:
            self._ds = _open(self.path)
            if not self.same_grid:
                from rasterio.enums import Resampling
                from rasterio.vrt import WarpedVRT

                # a tolerance of a millionth of a pixel: in effect GDAL's exact transformer, so every window
                # warps as the whole raster would (0 itself fails in rasterio 1.4: no transformer is made)
                self._vrt = WarpedVRT(self._ds, crs=self.grid.crs, transform=self.grid.transform,
                                      width=self.grid.width, height=self.grid.height,
                                      resampling=Resampling.nearest, add_alpha=True, tolerance=1e-6)
        return self._vrt if self._vrt is not None else self._ds

    def read(self, window: Window) -> tuple[np.ndarray, np.ndarray]:
        """Raw values of `window` and where they are labelled (not nodata, inside the raster)."""
        from rasterio.windows import Window as RWindow

        ds = self._source()
        w = RWindow(window.col_off, window.row_off, window.width, window.height)
        try:
            if self._vrt is not None:
                raw, alpha = ds.read([1, ds.count], window=w)
                return raw, alpha > 0
            raw = ds.read(1, window=w)
        except Exception as e:  # GDAL decode errors surface as several rasterio types
            raise DatasetError(f"{self.path}: cannot read labels at rows {window.row_off}..{window.row_end} "
                               f"({first_line(e)})") from None
        labelled = np.ones(raw.shape, bool) if self.nodata is None else raw != self.nodata
        return raw, labelled

    def close(self) -> None:
        for ds in (self._vrt, self._ds):
            if ds is not None:
                ds.close()
        self._ds = self._vrt = None


def _colormap(ds) -> dict[int, tuple] | None:
    try:
        return ds.colormap(1)
    except ValueError:  # no colour table
        return None


@dataclass
class Polygons:
    """A vector layer's polygons in one CRS with a value each (a class value, or 1 for an area
    of interest), indexed for window queries."""

    geometries: np.ndarray   # shapely geometries
    values: np.ndarray       # int64, one per geometry
    bounds: tuple[float, float, float, float]
    _tree: Any = field(default=None, repr=False)

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_tree": None}

    def rasterize(self, grid: Grid, window: Window, fill: int) -> np.ndarray:
        """int32 (h, w): the value of the polygon covering each pixel centre (the later one where
        several do), `fill` elsewhere."""
        import shapely
        from rasterio.features import rasterize

        if self._tree is None:
            self._tree = shapely.STRtree(self.geometries)
        transform = grid.window_transform(window)
        x0, y0 = transform * (0, 0)
        x1, y1 = transform * (window.width, window.height)
        box = shapely.box(min(x0, x1), min(y0, y1), max(x0, x1), max(y0, y1))
        hits = np.sort(self._tree.query(box))  # in file order: later features draw over earlier ones
        out = np.full((window.height, window.width), fill, np.int32)
        if len(hits):
            rasterize(zip(self.geometries[hits], self.values[hits].tolist()), out=out, transform=transform,
                      fill=fill, dtype="int32")
        return out


@dataclass
class VectorLayer:
    """A layer of a vector file, read once with pyogrio; `in_grid` gives its polygons in an
    image's CRS (reprojected once per CRS)."""

    path: Path
    layer: str | int | None
    field: str | None
    crs: Any
    wkb: np.ndarray
    field_values: np.ndarray | None
    _projected: dict = field(default_factory=dict, repr=False)
    repaired: int = 0  # invalid polygons (self-intersecting, ...) made valid when read

    @classmethod
    def read(cls, path: Path, layer: str | None = None, class_field: str | None = None) -> "VectorLayer":
        import pyogrio
        from pyogrio import raw

        path = Path(path)
        if not path.is_file():
            raise DatasetError(f"vector file not found: {path}")
        try:
            layers = [str(n) for n, _ in pyogrio.list_layers(path)]
            if layer is not None and layer not in layers:
                raise DatasetError(f"{path} has no layer {layer!r} (its layers: {', '.join(layers)})")
            if layer is None and len(layers) > 1:
                raise DatasetError(f"{path} has {len(layers)} layers ({', '.join(layers)}); choose one with --layer")
            info = pyogrio.read_info(path, layer=layer)
            fields = [str(f) for f in info["fields"]]
            if class_field is not None and class_field not in fields:
                raise DatasetError(f"{path} has no field {class_field!r} for --class-field (its fields: "
                                   f"{', '.join(fields[:12])}{', ...' if len(fields) > 12 else ''})")
            meta, _, wkb, values = raw.read(path, layer=layer, columns=[class_field] if class_field else [],
                                            force_2d=True)
        except DatasetError:
            raise
        except Exception as e:  # pyogrio's DataSourceError and GDAL's own
            raise DatasetError(f"{path}: not a readable vector file ({first_line(e)})") from None
        crs = meta.get("crs")
        keep = np.array([g is not None for g in wkb], bool)
        import shapely

        geoms = shapely.from_wkb(wkb[keep])
        repaired = _repair(geoms)
        found = cls(path, layer, class_field, crs, shapely.to_wkb(geoms) if repaired else wkb[keep],
                    values[0][keep] if class_field else None)
        found.repaired = repaired
        found.check_coordinates(info.get("driver"), shapely.total_bounds(geoms) if len(geoms) else None)
        return found

    def check_coordinates(self, driver: str | None, bounds) -> None:
        """A layer whose CRS is geographic (GeoJSON without a `crs` member is WGS84 by definition)
        but whose coordinates (`bounds`) cannot be longitudes and latitudes: projected metres written
        without saying so, a common slip. One line that says how to fix it, not PROJ's error later."""
        if self.crs is None or bounds is None:
            return
        from pyproj import CRS

        try:
            geographic = CRS.from_user_input(self.crs).is_geographic
        except Exception:  # a CRS pyproj cannot read: the reprojection says what is wrong
            return
        x0, y0, x1, y1 = bounds
        if geographic and (min(x0, y0) < -360 or max(x1, y1) > 360):
            declared = "declares no CRS (GeoJSON then means WGS84 longitudes and latitudes)" \
                if driver == "GeoJSON" else f"says its CRS is {self.crs}"
            raise DatasetError(f"{self.path}: its coordinates ({x0:.0f}..{x1:.0f}, {y0:.0f}..{y1:.0f}) look "
                               f"projected (metres), but the file {declared}; write the CRS they are in, e.g. "
                               f"ogr2ogr -a_srs EPSG:32633 fixed.gpkg {self.path.name}")

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_projected": {}}

    def polygons(self, grid: Grid, values: np.ndarray) -> Polygons:
        """The layer's polygons in `grid`'s CRS, each with `values[i]`; reprojected once per CRS."""
        import shapely

        key = str(grid.crs)
        if key not in self._projected:
            geoms = shapely.from_wkb(self.wkb)
            if grid.georeferenced:
                if self.crs is None:
                    raise DatasetError(f"{self.path} has no CRS and its image is georeferenced: say which CRS "
                                       f"the polygons are in (a .prj beside a Shapefile, or reproject it)")
                geoms = _reproject(geoms, self.crs, grid.crs)
            elif self.crs is not None:
                raise DatasetError(f"{self.path} is in {self.crs} but its image has no georeferencing; "
                                   f"polygons can only label an image without a CRS in pixel coordinates")
            self._projected[key] = geoms
        geoms = self._projected[key]
        polys = shapely.get_type_id(geoms)
        keep = np.isin(polys, (3, 6, 7))  # polygons, multipolygons, collections: lines and points label nothing
        bounds = tuple(shapely.total_bounds(geoms[keep])) if keep.any() else (0.0, 0.0, 0.0, 0.0)
        return Polygons(geoms[keep], values[keep].astype(np.int64), bounds)


def _repair(geoms: np.ndarray) -> int:
    """Repair every invalid polygon (a self-intersecting ring, a bow-tie) in place with shapely's
    `make_valid` (GEOS: the same area, split where the ring crosses itself); how many there were."""
    import shapely

    invalid = ~shapely.is_valid(geoms)
    if invalid.any():
        geoms[invalid] = shapely.make_valid(geoms[invalid])
    return int(invalid.sum())


def _reproject(geoms: np.ndarray, src_crs, dst_crs) -> np.ndarray:
    """Every coordinate transformed once, vectorised (GDAL's transformer through rasterio)."""
    import shapely
    from rasterio.crs import CRS
    from rasterio.warp import transform

    src, dst = CRS.from_user_input(src_crs), CRS.from_user_input(dst_crs)
    if src == dst:
        return geoms

    def move(coords: np.ndarray) -> np.ndarray:
        if not len(coords):
            return coords
        xs, ys = transform(src, dst, coords[:, 0], coords[:, 1])
        return np.column_stack([xs, ys])
    return shapely.transform(geoms, move)


class VectorLabels:
    """Polygons of a layer as label values: the class field's value (a value or a class name of
    the table), or 1 for every polygon without a class field; `background` where no polygon is,
    within the polygons' extent (outside it, unlabelled, unless an area of interest says more)."""

    def __init__(self, layer: VectorLayer, grid: Grid, values: np.ndarray, background: int | None,
                 extent_only: bool = True):
        self.layer, self.grid = layer, grid
        self.polygons = layer.polygons(grid, values)
        self.background = background
        self.extent_only = extent_only
        self.dtype, self.colormap = np.dtype(np.int32), None
        if not len(self.polygons.geometries):
            raise DatasetError(f"{layer.path}: no polygon in the layer")
        gl, gb, gr, gt = grid.bounds()
        left, bottom, right, top = self.polygons.bounds
        if left >= gr or right <= gl or bottom >= gt or top <= gb:
            raise DatasetError(f"{layer.path}: the polygons do not overlap their image ({left:.6g},{bottom:.6g} to "
                               f"{right:.6g},{top:.6g} against the image's {gl:.6g},{gb:.6g} to {gr:.6g},{gt:.6g} "
                               f"in the image's CRS)")

    def read(self, window: Window) -> tuple[np.ndarray, np.ndarray]:
        none = -1
        raw = self.polygons.rasterize(self.grid, window, none)
        labelled = raw != none
        if self.background is not None:
            raw[~labelled] = self.background
            labelled = np.ones_like(labelled) if not self.extent_only else self._inside_extent(window)
        return raw, labelled

    def _inside_extent(self, window: Window) -> np.ndarray:
        """Pixels whose centre lies inside the polygons' bounding box."""
        t = self.grid.window_transform(window)
        cols = np.arange(window.width) + 0.5
        rows = np.arange(window.height) + 0.5
        xs = t.c + t.a * cols
        ys = t.f + t.e * rows
        left, bottom, right, top = self.polygons.bounds
        return ((ys >= bottom) & (ys <= top))[:, None] & ((xs >= left) & (xs <= right))[None, :]

    def close(self) -> None:
        pass


class AreaOfInterest:
    """Polygons outside which a scene is not labelled (a vector file, any CRS)."""

    def __init__(self, path: Path, grid: Grid):
        layer = VectorLayer.read(Path(path))
        self.path, self.grid = Path(path), grid
        self.polygons = layer.polygons(grid, np.ones(len(layer.wkb), np.int64))
        if not len(self.polygons.geometries):
            raise DatasetError(f"{path}: the area of interest has no polygon")

    def inside(self, window: Window) -> np.ndarray:
        return self.polygons.rasterize(self.grid, window, 0) > 0
