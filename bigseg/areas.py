"""How much of each class a mask holds: pixel counts, area in square metres and hectares, and the
share of valid pixels, accumulated block by block as the mask is written (no second read).

A pixel's ground area: in a projected CRS |a e - b d| of the affine transform, in the CRS's unit
squared (converted to metres); in a geographic CRS it depends on the latitude, and each row's cells
get their exact area on the CRS's ellipsoid (between two parallels: a closed form, `zone_area`).
Without georeferencing, areas are in pixels.
Polygon areas and perimeters (vector output) are computed the same way: planar in a projected CRS,
geodesic on the ellipsoid in a geographic one.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

NODATA = 255


@dataclass
class Ground:
    """The pixel grid's place on Earth: CRS and transform (None: pixels only)."""

    crs: Any = None
    transform: Any = None

    @property
    def georeferenced(self) -> bool:
        return self.crs is not None and self.transform is not None

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
        if self.geographic:
            area, perimeter = self.geod().geometry_area_perimeter(geometry)
            return abs(area), perimeter
        f = self.metres_per_unit
        return geometry.area * f * f, geometry.length * f


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
        counts = np.stack([np.bincount(row[row < n], minlength=n) for row in labels]) if self.ground.geographic \
            else np.bincount(labels[labels < n].ravel(), minlength=n)[None]
        if self.ground.geographic:  # each row its own cell area
            areas = self._areas(np.arange(row_off, row_off + h))
            self.area_m2 += (counts * areas[:, None]).sum(0)
            counts = counts.sum(0)
        else:
            counts = counts[0]
            self.area_m2 += counts * self._areas(np.array([row_off]))[0]
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
                "units": "m2" if self.ground.georeferenced else "pixels", "classes": self.table()}

    def csv(self) -> str:
        lines = ["value,class,pixels,area_m2,area_ha,share_of_valid"]
        for row in self.table():
            name = '"' + row["class"].replace('"', '""') + '"' if "," in row["class"] else row["class"]
            lines.append(f"{row['value']},{name},{row['pixels']},{'' if row['area_m2'] is None else row['area_m2']},"
                         f"{'' if row['area_ha'] is None else row['area_ha']},{row['share']}")
        return "\n".join(lines) + "\n"
