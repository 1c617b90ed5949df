"""Class tables: which label value is which class, its name and colour, and which values are
unlabelled. A table maps raw label values (any integer type) to the model's class indices
0..C-1, with IGNORE (255) for unlabelled pixels.

Where a table comes from: `classes.csv` (`value,name,red,green,blue`) beside the labels, the
legacy `classes.json` of the generic layout, a label raster's colour table (class names then
`class N`), or the fixed tables of CamVid and Cityscapes. A value that is in no table is an
error naming it and the file, except for the street-scene sets, whose releases use other values
for void on purpose.
"""
from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bigseg.errors import DatasetError
from bigseg.metrics import IGNORE
from bigseg.palette import default_palette

LUT_SIZE = 1 << 16  # label values a lookup table covers (8- and 16-bit label rasters)


@dataclass(frozen=True)
class ClassTable:
    """`names[i]` and `palette[i]` of model class i, labelled by raw value `codes[i]`; `ignore`:
    raw values that mean "unlabelled"; `unknown`: what other values become ("error" or "ignore")."""

    names: tuple[str, ...]
    palette: tuple[tuple[int, int, int], ...]
    codes: tuple[int, ...]
    ignore: tuple[int, ...] = (IGNORE,)
    unknown: str = "error"
    source: str = ""

    def __post_init__(self):
        if not self.names:
            raise DatasetError(f"{self.source}: the class table lists no class")
        if len(set(self.codes)) != len(self.codes):
            raise DatasetError(f"{self.source}: a label value is listed for two classes")
        if len(self.names) > IGNORE - 1:
            raise DatasetError(f"{self.source}: {len(self.names)} classes; bigseg labels at most {IGNORE - 1}")

    @property
    def classes(self) -> list[str]:
        return list(self.names)

    def lut(self) -> np.ndarray:
        """int16[65536]: raw value -> class index, IGNORE, or -1 for a value in no table."""
        lut = np.full(LUT_SIZE, -1 if self.unknown == "error" else IGNORE, np.int16)
        for v in self.ignore:
            if 0 <= v < LUT_SIZE:
                lut[v] = IGNORE
        for i, v in enumerate(self.codes):
            if 0 <= v < LUT_SIZE:
                lut[v] = i
        return lut

    def map(self, raw: np.ndarray, where: str, lut: np.ndarray | None = None) -> np.ndarray:
        """Raw label values -> uint8 class indices (IGNORE where unlabelled); a value in no table
        is a DatasetError that names it and `where`."""
        lut = self.lut() if lut is None else lut
        if raw.dtype.kind == "b":
            raw = raw.astype(np.uint8)
        if raw.dtype.kind not in "iu":
            if raw.dtype.kind != "f" or not np.array_equal(raw[np.isfinite(raw)], np.round(raw[np.isfinite(raw)])):
                raise DatasetError(f"{where}: labels must be whole numbers (class values), found {raw.dtype} values")
            raw = np.where(np.isfinite(raw), raw, self.ignore[0]).astype(np.int64)
        inside = (raw >= 0) & (raw < LUT_SIZE) if raw.dtype.kind == "i" or raw.dtype.itemsize > 2 else None
        if inside is None:
            out = lut[raw]
        else:
            out = np.full(raw.shape, -1 if self.unknown == "error" else IGNORE, np.int16)
            out[inside] = lut[raw[inside]]
        if self.unknown == "error" and (out < 0).any():
            value = raw[out < 0].flat[0]
            raise DatasetError(f"{where}: label value {value} is in no class table ({self.source}); add it to "
                               f"classes.csv, or make it the label raster's nodata to ignore it")
        return out.astype(np.uint8)


def read_classes_csv(path: Path, nodata: float | None = None) -> ClassTable:
    """`value,name,red,green,blue` rows (colours optional); value 255 and the labels' nodata are
    "unlabelled" whatever their name."""
    try:
        with open(path, newline="") as f:
            rows = [r for r in csv.reader(f) if r and not r[0].startswith("#")]
    except (OSError, UnicodeDecodeError) as e:
        raise DatasetError(f"{path}: cannot read the class table ({e})") from None
    if rows and not rows[0][0].strip().lstrip("-").isdigit():
        header = [h.strip().lower() for h in rows.pop(0)]
        if header[:2] != ["value", "name"]:
            raise DatasetError(f"{path}: expected the columns value,name,red,green,blue; got {','.join(header)}")
    names, codes, palette, ignore = [], [], [], {IGNORE}
    for n, row in enumerate(rows, 2):
        try:
            value, name = int(row[0]), row[1].strip()
            colour = tuple(int(c) for c in row[2:5]) if len(row) >= 5 else None
        except (ValueError, IndexError):
            raise DatasetError(f"{path}, line {n}: expected value,name,red,green,blue; got {','.join(row)}") from None
        if value == IGNORE or (nodata is not None and value == nodata):
            ignore.add(value)
            continue
        names.append(name)
        codes.append(value)
        palette.append(colour)
    fill = default_palette(len(names))
    palette = [c if c is not None else tuple(fill[i]) for i, c in enumerate(palette)]
    return ClassTable(tuple(names), tuple(palette), tuple(codes), tuple(sorted(ignore)), "error", str(path))


def read_classes_json(path: Path) -> ClassTable:
    """The generic layout's `{"classes": [...], "palette": [[r, g, b], ...], "ignore": [values]}`:
    class i is labelled i."""
    try:
        spec = json.loads(path.read_text())
        names = [str(c) for c in spec["classes"]]
        palette = [tuple(int(v) for v in c) for c in spec.get("palette", default_palette(len(names)))]
        ignore = {int(v) for v in spec.get("ignore", [])} | {IGNORE}
    except (ValueError, KeyError, TypeError) as e:
        raise DatasetError(f"{path}: expected {{\"classes\": [...], \"palette\": [...]}} ({e})") from None
    if len(palette) < len(names):
        raise DatasetError(f"{path}: {len(names)} classes but {len(palette)} colours")
    codes = [i for i in range(len(names)) if i not in ignore]
    return ClassTable(tuple(names[i] for i in codes), tuple(palette[i] for i in codes), tuple(codes),
                      tuple(sorted(ignore)), "error", str(path))


def table_from_values(values: list[int], colormap: dict[int, tuple] | None, where: str,
                      names: list[str] | None = None) -> ClassTable:
    """A table of the label values found in the labels, named by the label raster's category names
    where it has them (else `class N`) and coloured from its colour table where it has one. Only
    the labels' nodata is unlabelled here: a 0/255 mask has two classes."""
    if not values:
        raise DatasetError(f"{where}: the labels hold no labelled pixel")
    fill = default_palette(max(values) + 1)
    palette = tuple(tuple(colormap[v][:3]) if colormap and v in colormap else tuple(fill[v]) for v in values)
    named = tuple(names[v] if names and v < len(names) and names[v] else f"class {v}" for v in values)
    return ClassTable(named, palette, tuple(values), (), "error",
                      f"{where} (no classes.csv: classes are the label values found)")


def fixed_table(names: list[str], palette: list[list[int]], codes: list[int], source: str) -> ClassTable:
    """A data set's own table (CamVid, Cityscapes): every other value is void."""
    return ClassTable(tuple(names), tuple(tuple(c) for c in palette), tuple(codes), (), "ignore", source)
