"""A class mask's polygons as features of a vector file, fed the mask's full-width rows from top to
bottom (`PolygonFeatures.add`), whether the mask is being written (`bigseg predict --vector`) or
read back (`bigseg vectorize`): the same strips, so the same polygons either way.

Each polygon carries its class value and name, its area and perimeter (square metres and metres,
geodesic on the ellipsoid for a geographic CRS; pixels without a CRS) and the source, in the mask's
CRS. `min_area` drops regions smaller than so many square metres (pixels without a CRS);
`simplify` simplifies each polygon on its own (Douglas-Peucker, topology kept within the polygon):
neighbours' shared edges may then part by up to the tolerance, since a streaming run never holds the
whole coverage (0, the default, keeps them exact).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bigseg.errors import InputError
from bigseg.vector.areas import Ground
from bigseg.vector.layers import Field, VectorWriter, vector_format
from bigseg.vector.polygons import StreamingPolygons

STRIP_PIXELS = 1 << 22  # pixels of one strip (at least 64 rows): what bounds the memory


@dataclass(frozen=True)
class VectorOptions:
    """`format` (gpkg, geojson, fgb, shp); `classes` to keep (values or names; None: all);
    `min_area` (square metres, geodesic in a geographic CRS; pixels without a CRS); `simplify`
    tolerance (map units); `connectivity` 4 or 8."""

    format: str = "gpkg"
    classes: tuple[str, ...] | None = None
    min_area: float = 0.0
    simplify: float = 0.0
    connectivity: int = 4

    def check(self) -> None:
        vector_format(self.format)
        if self.min_area < 0:
            raise InputError(f"must be 0 or more, got {self.min_area}", param="min_area")
        if self.simplify < 0:
            raise InputError(f"must be 0 or more, got {self.simplify}", param="simplify")
        if self.connectivity not in (4, 8):
            raise InputError(f"must be 4 or 8, got {self.connectivity}", param="connectivity")


def strip_rows(width: int, height: int) -> int:
    """Rows of one strip of a `width` x `height` mask."""
    return max(64, min(height, STRIP_PIXELS // max(width, 1)))


class PolygonFeatures:
    """The polygons of a `ground.width` x `ground.height` class mask into the vector file `dst`.
    `names`: class names by value; `nodata`: the value that is never a region; `source`: the
    mask's path, an attribute of every feature. `add` takes rows in order; `commit` finishes."""

    def __init__(self, dst: Path, ground: Ground, names: list[str], options: VectorOptions, source: str,
                 nodata: int | None):
        options.check()
        if not ground.georeferenced and vector_format(dst.suffix)[0] == "GeoJSON":
            raise InputError(f"{Path(source).name} has no georeferencing: its polygons would be in pixel "
                             f"coordinates, which every GeoJSON reader takes for longitudes and latitudes "
                             f"(GeoJSON has no way to say 'no CRS'); write gpkg or fgb, which record none")
        self.ground, self.names, self.options, self.source = ground, names, options, source
        self.polygons = StreamingPolygons(ground.width, ground.height, options.connectivity,
                                          keep_classes(options.classes, names), nodata)
        self.strip = strip_rows(ground.width, ground.height)
        self._held: list[np.ndarray] = []
        self._top = 0  # the first row not yet polygonised
        dst.parent.mkdir(parents=True, exist_ok=True)
        self.writer = VectorWriter(dst, ground.crs, fields(ground),
                                   "Polygon" if options.connectivity == 4 else "MultiPolygon", "classes")

    @property
    def count(self) -> int:
        return self.writer.count

    def add(self, top: int, rows: np.ndarray) -> None:
        """The mask's rows from `top` (the row after the last ones given), full width."""
        self._held.append(rows)
        held = sum(len(r) for r in self._held)
        while held >= self.strip or (held and self._top + held >= self.ground.height):
            block = np.concatenate(self._held) if len(self._held) > 1 else self._held[0]
            n = min(self.strip, len(block))
            self._polygonise(block[:n])
            self._held = [block[n:]] if n < len(block) else []
            held -= n

    def _polygonise(self, strip: np.ndarray) -> None:
        for value, geometry in self.polygons.add(strip, self._top):
            self._write(value, geometry)
        self._top += len(strip)

    def commit(self) -> Path:
        for value, geometry in self.polygons.finish():
            self._write(value, geometry)
        return self.writer.commit()

    def abort(self) -> None:
        self.writer.abort()

    def _write(self, value: int, geometry) -> None:
        """One region: in map coordinates, kept if large enough, simplified, measured, written."""
        import shapely
        from shapely import affinity

        ground = self.ground
        if ground.georeferenced:
            t = ground.transform
            geometry = affinity.affine_transform(geometry, [t.a, t.b, t.d, t.e, t.c, t.f])
        area, perimeter = ground.measure(geometry)
        if area < self.options.min_area:
            return
        if self.options.simplify:
            geometry = shapely.simplify(geometry, self.options.simplify, preserve_topology=True)
            area, perimeter = ground.measure(geometry)
        name = self.names[value] if value < len(self.names) else str(value)
        self.writer.add(geometry, [int(value), name, round(float(area), 4), round(float(perimeter), 4), self.source])


def keep_classes(classes: tuple[str, ...] | None, names: list[str]) -> set[int] | None:
    """The class values `classes` names (values or names); None: every class."""
    if not classes:
        return None
    keep = set()
    for c in classes:
        if c.isdigit():
            keep.add(int(c))
        elif c in names:
            keep.add(names.index(c))
        else:
            raise InputError(f"names no class {c!r} (the mask's classes: {', '.join(names[:12])})", param="classes")
    return keep


def fields(ground: Ground) -> list[Field]:
    unit = ("m2", "m") if ground.georeferenced else ("px", "px")
    return [Field("class", int), Field("class_name", str), Field(f"area_{unit[0]}", float),
            Field(f"perimeter_{unit[1]}", float), Field("source", str)]
