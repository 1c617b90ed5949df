"""How much of each class a mask holds: pixel counts, area in square metres and hectares, and the
share of valid pixels, accumulated row block by row block as the mask is written (no second read).

Areas are ground areas, on the CRS's ellipsoid wherever the map's scale is not true (`method`):
- `geodesic` in a geographic CRS: each row's cells get their exact area between two parallels
  (a closed form, `zone_area`); polygons are measured on the ellipsoid (pyproj's Geod).
- `ellipsoidal` in a projected CRS whose scale over the grid is off by more than `SCALE_TOLERANCE`
  (Web Mercator, 1.7x the ground area at 40 degrees; equal-area maps' lengths): each pixel's map area
  divided by the projection's areal scale at it (pyproj's factors, sampled every `SCALE_STEP` pixels:
  the scale changes by far less than the tolerance in between); polygons are projected to
  longitudes and latitudes and measured on the ellipsoid.
- `planar` in a projected CRS with near-true scale over the grid (UTM, national grids): |a e - b d|
  of the affine transform in the CRS's unit squared, converted to metres; polygons planar.
- `pixels` without georeferencing.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import numpy as np

from bigseg.tiling.geometry import Georef

SCALE_TOLERANCE = 0.005  # planar areas where the map's scale is within 0.5% of true over the grid
SCALE_STEP = 64          # pixels between the samples of a distorted projection's areal scale


@dataclass
class Ground:
    """The pixel grid's place on Earth (a `Georef`; None or one without CRS and transform: pixels
    only) and, to judge the projection's scale over the whole grid, its width and height in pixels."""

    georef: Georef | None = None
    width: int = 1
    height: int = 1

    @property
    def georeferenced(self) -> bool:
        return self.georef is not None and self.georef.mapped

    @property
    def crs(self) -> Any:
        return self.georef.crs if self.georeferenced else None

    @property
    def transform(self) -> Any:
        return self.georef.transform if self.georeferenced else None

    @cached_property
    def method(self) -> str:
        """How areas are measured: geodesic, ellipsoidal, planar or pixels (see the module)."""
        if not self.georeferenced:
            return "pixels"
        if self.geographic:
            return "geodesic"
        return "ellipsoidal" if self._distorted() else "planar"

    def _distorted(self) -> bool:
        """Whether the projection's areal, meridional or parallel scale is off by more than the
        tolerance anywhere on the grid's corners, edges' midpoints and centre."""
        cols = np.array([0, self.width / 2, self.width] * 3, np.float64)
        rows = np.repeat(np.array([0, self.height / 2, self.height], np.float64), 3)
        factors = self._factors(cols, rows)
        if factors is None:
            return False
        scales = np.stack([factors.areal_scale, factors.meridional_scale, factors.parallel_scale])
        return bool(np.nanmax(np.abs(scales - 1)) > SCALE_TOLERANCE)

    @cached_property
    def _geodetic(self):
        """(to longitude and latitude, the projection) of a projected CRS; None where pyproj cannot
        invert or factor it."""
        from pyproj import CRS, Proj, Transformer

        try:
            crs = CRS.from_user_input(self.crs.to_wkt())
            return Transformer.from_crs(crs, crs.geodetic_crs, always_xy=True), Proj(crs)
        except Exception:  # pyproj's own error types
            return None

    def _factors(self, cols: np.ndarray, rows: np.ndarray):
        """pyproj's projection factors at pixel positions (None where the CRS has none to give)."""
        if self._geodetic is None:
            return None  # taken at its word: planar
        to_lonlat, projection = self._geodetic
        t = self.transform
        x, y = t.c + t.a * cols + t.b * rows, t.f + t.d * cols + t.e * rows
        try:
            return projection.get_factors(*to_lonlat.transform(x, y))
        except Exception:  # a point pyproj cannot factor
            return None

    def inverse_areal_scale(self, row_off: int, height: int) -> np.ndarray:
        """(height, width) ground square metres per map square metre of each pixel of the rows
        from `row_off`, sampled every `SCALE_STEP` pixels (ellipsoidal method); each sample row is
        computed once per grid."""
        step = SCALE_STEP
        samples = self.__dict__.setdefault("_inverse_scale_rows", {})
        first, last = row_off // step, (row_off + height - 1) // step
        missing = [k for k in range(first, last + 1) if k not in samples]
        if missing:
            cols = np.arange(step / 2, self.width + step / 2, step, dtype=np.float64)
            cc, rr = np.meshgrid(cols, np.array(missing, np.float64) * step + step / 2)
            scale = np.asarray(self._factors(cc.ravel(), rr.ravel()).areal_scale, np.float64).reshape(cc.shape)
            samples.update(zip(missing, 1.0 / scale))
        rows = np.stack([samples[k] for k in range(first, last + 1)])
        r = np.arange(row_off, row_off + height) // step - first
        return rows[r][:, np.arange(self.width) // step]

    @property
    def geographic(self) -> bool:
        return self.georeferenced and self.crs.is_geographic

    @property
    def metres_per_unit(self) -> float:
        """The CRS's linear unit in metres (1 for metres; feet, US survey feet, ...)."""
        if not self.georeferenced or self.geographic:
            return 1.0
        try:
            return float(self.crs.linear_units_factor[1])
        except Exception:  # a CRS without a known unit: taken as metres
            return 1.0

    def pixel_metres(self) -> tuple[float, float] | None:
        """A pixel's ground size in metres (across, down) at the grid's centre, measured as areas
        are (`method`): the CRS's pixel size in metres where the map's scale is near true; divided
        by the projection's parallel and meridional scale there where it is not (Web Mercator's
        1/cos(latitude)); on the ellipsoid across and down one pixel in a geographic CRS. None
        without georeferencing, in a projected CRS whose unit is not a length, or at coordinates
        that are not on the Earth."""
        if not self.georeferenced:
            return None
        t = self.transform
        across, down = float(np.hypot(t.a, t.d)), float(np.hypot(t.b, t.e))
        cx, cy = self.width / 2, self.height / 2
        if self.geographic:
            x, y = t.c + t.a * cx + t.b * cy, t.f + t.d * cx + t.e * cy
            geod = self.geod()
            sizes = float(geod.inv(x, y, x + t.a, y + t.d)[2]), float(geod.inv(x, y, x + t.b, y + t.e)[2])
            return sizes if all(np.isfinite(sizes)) and min(sizes) > 0 and abs(y) <= 90 else None  # on the Earth
        try:
            m = float(self.crs.linear_units_factor[1])
        except Exception:  # a CRS without a known linear unit
            return None
        if self.method == "planar":
            return across * m, down * m
        factors = self._factors(np.array([cx]), np.array([cy]))
        along, meridian = (np.nan, np.nan) if factors is None else (
            float(np.ravel(factors.parallel_scale)[0]), float(np.ravel(factors.meridional_scale)[0]))
        if not (np.isfinite(along) and np.isfinite(meridian) and along > 0 and meridian > 0):
            return across * m, down * m
        return across * m / along, down * m / meridian

    def geod(self):
        from pyproj import CRS, Geod

        return CRS.from_user_input(self.crs.to_wkt()).get_geod() or Geod(ellps="WGS84")

    def row_cell_areas(self, rows: np.ndarray) -> np.ndarray:
        """Square metres of one pixel in each of the `rows` (pixels' own area without a CRS: 1)."""
        if not self.georeferenced:
            return np.ones(len(rows))
        t = self.transform
        if not self.geographic:
            return np.full(len(rows), abs(t.a * t.e - t.b * t.d) * self.metres_per_unit ** 2)
        geod = self.geod()
        lat0 = np.radians(t.f + t.e * np.asarray(rows, np.float64))
        lat1 = np.radians(t.f + t.e * (np.asarray(rows, np.float64) + 1))
        return np.abs(zone_area(geod.a, geod.f, lat1) - zone_area(geod.a, geod.f, lat0)) * abs(t.a) / 360.0

    def measure(self, geometry) -> tuple[float, float]:
        """(area m^2, perimeter m) of a polygon in the grid's CRS (pixels and pixel edges without one)."""
        if self.method == "ellipsoidal":
            geometry = self._to_lonlat(geometry)
        if self.method in ("geodesic", "ellipsoidal"):
            area, perimeter = self.geod().geometry_area_perimeter(geometry)
            return abs(area), perimeter
        f = self.metres_per_unit
        return geometry.area * f * f, geometry.length * f

    def _to_lonlat(self, geometry):
        import shapely

        to_lonlat = self._geodetic[0]
        return shapely.transform(geometry, lambda xy: np.column_stack(to_lonlat.transform(xy[:, 0], xy[:, 1])))


def zone_area(a: float, f: float, latitude: np.ndarray) -> np.ndarray:
    """The area between the equator and `latitude` (radians) over all longitudes, on the ellipsoid
    of semi-major axis `a` and flattening `f` (closed form; a grid cell between two parallels is
    the difference of two zones times its share of 360 degrees)."""
    b = a * (1 - f)
    e = np.sqrt(1 - (b / a) ** 2)
    s = np.sin(latitude)
    if e == 0:
        return 2 * np.pi * a * a * s
    return np.pi * b * b * (s / (1 - e * e * s * s) + np.log((1 + e * s) / (1 - e * s)) / (2 * e))


@dataclass
class AreaStats:
    """Per-class pixel counts and ground areas of a mask, fed block by block (`add`)."""

    classes: list[str]
    ground: Ground = field(default_factory=Ground)
    named: int | None = None  # classes with a name; the others (numbers) are listed only where present
    pixels: np.ndarray = None
    area_m2: np.ndarray = None
    valid_pixels: int = 0
    nodata_pixels: int = 0

    def __post_init__(self):
        n = len(self.classes)
        self.pixels = np.zeros(n, np.int64)
        self.area_m2 = np.zeros(n, np.float64)
        self._row_areas: dict[int, float] = {}

    def add(self, row_off: int, labels: np.ndarray, valid: np.ndarray | None = None) -> None:
        """The labels (h, w) of a block whose first row is `row_off`; pixels `valid` marks False
        and values of no class (NODATA) are no data."""
        n = len(self.classes)
        h = labels.shape[0]
        labels = np.where(valid, labels, n) if valid is not None else labels
        method = self.ground.method
        if method == "geodesic":  # each row its own cell area
            counts = np.stack([np.bincount(row[row < n], minlength=n) for row in labels])
            areas = self._areas(np.arange(row_off, row_off + h))
            self.area_m2 += (counts * areas[:, None]).sum(0)
            counts = counts.sum(0)
        else:
            keep = labels < n
            counts = np.bincount(labels[keep].ravel(), minlength=n)
            planar = self._areas(np.array([row_off]))[0]
            if method == "ellipsoidal":  # each pixel its map area over the areal scale there
                weights = self.ground.inverse_areal_scale(row_off, h)[:, :labels.shape[1]][keep]
                self.area_m2 += np.bincount(labels[keep].ravel(), weights=weights.ravel(), minlength=n) * planar
            else:
                self.area_m2 += counts * planar
        self.pixels += counts
        valid = int(counts.sum())
        self.valid_pixels += valid
        self.nodata_pixels += labels.size - valid

    def _areas(self, rows: np.ndarray) -> np.ndarray:
        missing = [int(r) for r in rows if int(r) not in self._row_areas]
        if missing:
            for r, a in zip(missing, self.ground.row_cell_areas(np.array(missing))):
                self._row_areas[r] = float(a)
        return np.array([self._row_areas[int(r)] for r in rows])

    def table(self) -> list[dict[str, Any]]:
        """One row per class: value, name, pixels, square metres, hectares, share of valid pixels
        (areas in pixels without georeferencing)."""
        unit = self.ground.georeferenced
        named = len(self.classes) if self.named is None else self.named
        return [{"value": i, "class": name, "pixels": int(self.pixels[i]),
                 "area_m2": round(float(self.area_m2[i]), 3) if unit else None,
                 "area_ha": round(float(self.area_m2[i]) / 1e4, 6) if unit else None,
                 "share": round(float(self.pixels[i]) / max(self.valid_pixels, 1), 6)}
                for i, name in enumerate(self.classes) if i < named or self.pixels[i]]

    def to_dict(self) -> dict[str, Any]:
        return {"valid_pixels": self.valid_pixels, "nodata_pixels": self.nodata_pixels,
                "units": "m2" if self.ground.georeferenced else "pixels", "area_method": self.ground.method,
                "classes": self.table()}

    def csv(self) -> str:
        """The table, with the method of its areas in a last column (planar, ellipsoidal, geodesic or
        empty without georeferencing)."""
        method = self.ground.method if self.ground.georeferenced else ""
        lines = ["value,class,pixels,area_m2,area_ha,share_of_valid,area_method"]
        for row in self.table():
            name = '"' + row["class"].replace('"', '""') + '"' if "," in row["class"] else row["class"]
            lines.append(f"{row['value']},{name},{row['pixels']},{'' if row['area_m2'] is None else row['area_m2']},"
                         f"{'' if row['area_ha'] is None else row['area_ha']},{row['share']},{method}")
        return "\n".join(lines) + "\n"
