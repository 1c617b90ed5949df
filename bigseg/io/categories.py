"""Class names a class raster carries for GIS tools: the category names of band 1 in its GDAL PAM
sidecar (`NAME.tif.aux.xml`, as bigseg writes beside its masks and GDAL writes for GeoTIFFs).
Read with the standard library: rasterio does not expose GDAL's category names."""
from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from pathlib import Path


def category_names(raster: str | Path) -> list[str] | None:
    """Band 1's category names (index = class value), or None where the raster has none."""
    sidecar = Path(str(raster) + ".aux.xml")
    if not sidecar.is_file():
        return None
    try:
        root = ET.parse(sidecar).getroot()
    except (ET.ParseError, OSError):
        return None  # a damaged sidecar only loses the names
    for band in root.iter("PAMRasterBand"):
        if band.get("band", "1") == "1":
            names = band.find("CategoryNames")
            if names is not None:
                return [(c.text or "").strip() for c in names.findall("Category")]
    return None


def class_names(path: Path, tags: dict[str, str]) -> list[str] | None:
    """A class raster's class names: bigseg's `classes` tag, the category names of its `.aux.xml`,
    or None (classes are then their numbers)."""
    if "classes" in tags:
        try:
            names = json.loads(tags["classes"])
            if isinstance(names, list) and all(isinstance(n, str) for n in names):
                return names
        except ValueError:
            pass
    names = category_names(path)
    return names if names and any(names) else None
