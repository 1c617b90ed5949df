"""Vector files of polygons, written with pyogrio (GDAL's OGR) in batches as regions are finished:
to a temporary name beside the target, renamed when complete (a killed run leaves no file that
looks finished), and the class names a class raster carries."""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from bigseg.atomic import partial_path, remove
from bigseg.errors import InputError, OutputError, first_line

# name -> (OGR driver, suffix, the files it writes beside the main one)
FORMATS = {"gpkg": ("GPKG", ".gpkg", ()), "geojson": ("GeoJSON", ".geojson", ()),
           "fgb": ("FlatGeobuf", ".fgb", ()), "shp": ("ESRI Shapefile", ".shp", (".shx", ".dbf", ".prj", ".cpg"))}
BATCH = 2000  # features written per append


def vector_format(name: str) -> tuple[str, str]:
    """(driver, suffix) of a format named by its short name or OGR driver name."""
    key = name.lower().lstrip(".")
    for short, (driver, suffix, _) in FORMATS.items():
        if key in (short, driver.lower(), suffix.lstrip(".")) or (short == "shp" and key == "shapefile"):
            return driver, suffix
    raise InputError(f"takes {', '.join(FORMATS)} (GeoPackage, GeoJSON, FlatGeobuf, Shapefile), got {name!r}",
                     param="vector")


@dataclass
class Field:
    name: str
    kind: type  # int, float or str


class VectorWriter:
    """Polygons with attributes into `path` (format from its suffix), in the CRS `crs` (None: no
    CRS, pixel coordinates). `add` buffers; every `BATCH` features go to the temporary file;
    `commit` renames it (and a Shapefile's side files), `abort` removes it."""

    def __init__(self, path: Path, crs: Any, fields: list[Field], geometry_type: str, layer: str):
        self.path = Path(path)
        self.driver, _ = vector_format(self.path.suffix)
        self.crs = None if crs is None else crs.to_wkt()
        self.fields, self.geometry_type, self.layer = fields, geometry_type, layer
        self.tmp = partial_path(self.path)
        self._sides = FORMATS[next(k for k, v in FORMATS.items() if v[0] == self.driver)][2]
        self._remove_partial()
        self.geometries: list[bytes] = []
        self.values: list[list] = [[] for _ in fields]
        self.count = 0
        self._started = False

    def add(self, geometry, attributes: list) -> None:
        import shapely

        self.geometries.append(shapely.to_wkb(geometry))
        for column, value in zip(self.values, attributes):
            column.append(value)
        if len(self.geometries) >= BATCH:
            self.flush()

    def flush(self) -> None:
        if not self.geometries and self._started:
            return
        from pyogrio.raw import write

        kinds = {int: np.int64, float: np.float64, str: object}
        data = [np.array(v, dtype=kinds[f.kind]) for v, f in zip(self.values, self.fields)]
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # pyogrio warns of a missing CRS: said by the job instead
                write(str(self.tmp), np.array(self.geometries, dtype=object), data, fields=[f.name for f in self.fields],
                      geometry_type=self.geometry_type, crs=self.crs, driver=self.driver, layer=self.layer,
                      append=self._started, promote_to_multi=self.geometry_type == "MultiPolygon")
        except Exception as e:  # pyogrio's and GDAL's own error types
            raise OutputError(f"{self.path}: cannot write the polygons ({first_line(e)})") from None
        self._started = True
        self.count += len(self.geometries)
        self.geometries, self.values = [], [[] for _ in self.fields]

    def commit(self) -> Path:
        self.flush()  # an empty layer is written too: no region is an answer
        for side in self._sides:
            tmp_side, side_path = self.tmp.with_suffix(side), self.path.with_suffix(side)
            if tmp_side.exists():
                tmp_side.replace(side_path)
        self.tmp.replace(self.path)
        return self.path

    def abort(self) -> None:
        self._remove_partial()

    def _remove_partial(self) -> None:
        remove(self.tmp)
        for side in self._sides:
            remove(self.tmp.with_suffix(side))
