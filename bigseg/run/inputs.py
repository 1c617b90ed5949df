"""An input opened for a model: the bands, value range and pixel size the model was trained on
(stored in checkpoints trained on raster scenes) applied where the user chose none, and a note
where the input is far from what the model knows.

Pixel size (`ReadOptions.resolution`): `model` (the default) reads an input whose ground pixels are
more than `PIXEL_SIZE_TOLERANCE` times larger or smaller than the model's at the model's size,
resampled on the fly by GDAL, with one note; `native` never resamples; a number resamples to that
many metres. Pixel sizes are ground sizes at the input's centre (a Web Mercator or geographic
grid's CRS units are not). A model or input without a known pixel size is read as it is."""
from __future__ import annotations

from dataclasses import replace
import math
from pathlib import Path

import numpy as np

from bigseg.errors import InputError
from bigseg.infer.card import ModelCard
from bigseg.io.readers import Reader, ReadOptions, open_input
from bigseg.vector.areas import Ground


PIXEL_SIZE_TOLERANCE = 1.5  # a ground pixel this many times larger or smaller than the model's is noted


def open_for_model(src: Path, checkpoint: ModelCard, read: ReadOptions) -> Reader:
    """`open_input` with the model's own band list and value range as defaults (the user's
    `--bands` and `--value-range` win), and notes on a band count or pixel size far from the model's."""
    trained = checkpoint.input
    if read.bands is None and trained.get("bands") and trained["bands"] != list(range(1, checkpoint.in_channels + 1)):
        read = replace(read, bands=tuple(trained["bands"]))
    if read.value_range is None and trained.get("value_range"):
        read = replace(read, value_range=tuple(trained["value_range"]))
    reader = open_input(src, checkpoint.in_channels, read)
    measured = trained.get("pixel_size") or read.resolution not in ("model", "native")
    ground = ground_pixel(reader) if measured else None  # once: pyproj's transformer is made for it
    target, note = target_pixel(reader, trained, read.resolution, ground)
    if target is not None and read.engine in ("auto", "gdal"):  # another reader reads the file as it is
        native = (reader.width, reader.height)
        reader.close()
        reader = open_input(src, checkpoint.in_channels, read, pixel_size=target)
        reader.resampled, reader.native_size = note, native
        reader.notes.append(note)
    warnings = _differences(reader, trained, read.value_range is not None, ground)
    if reader.plan.replicate > 1:  # the warning says it, and what follows from it
        reader.notes = [n for n in reader.notes if not n.startswith("single band repeated")]
    reader.notes.extend(warnings)
    return reader


def parse_resolution(text: str) -> str | float:
    """`model`, `native` or a ground pixel size in metres (above 0)."""
    if text in ("model", "native"):
        return text
    try:
        metres = float(text)
    except ValueError:
        metres = 0.0
    if not metres > 0 or metres == float("inf"):
        raise InputError(f"takes model, native or a pixel size in metres, got {text!r}", param="resolution")
    return metres


def parse_output_grid(text: str) -> str:
    if text not in ("input", "model"):
        raise InputError(f"takes input or model, got {text!r}", param="output_grid")
    return text


def target_pixel(reader: Reader, trained: dict, resolution: str | float,
                 ground: float | None) -> tuple[float | None, str | None]:
    """The pixel size (in the CRS's units) to read `reader`'s input at, and the note that says so;
    (None, None) to read it as it is. Sizes are compared on the ground (`ground`, the input's
    ground pixel in metres from `ground_pixel`; None where it cannot be measured): in Web
    Mercator a CRS metre is 1/cos(latitude) ground metres, in a geographic CRS a degree is measured
    on the ellipsoid."""
    if resolution == "native":
        return None, None
    g = reader.georef
    if g is None or not g.mapped:
        if resolution != "model":
            raise InputError(f"{reader.path} has no georeferencing (CRS and transform): --resolution needs "
                             f"ground pixels; use --resolution native", param="resolution")
        return None, None
    px = abs(g.transform.a)
    if resolution != "model":
        if ground is None:
            raise InputError(f"{reader.path}'s pixels cannot be measured on the ground (its CRS has no unit of "
                             f"length, or its coordinates are not on the Earth): --resolution in metres needs "
                             f"them; use --resolution model or native", param="resolution")
        wanted = float(resolution)
        if math.isclose(wanted, ground, rel_tol=1e-6):
            return None, None
        return px * wanted / ground, f"read at {wanted:.3g} m pixels (resampled from {_size(reader, ground)}, --resolution)"
    compared = _against_model(reader, trained, ground)
    if compared is None or not _far(compared[0], trained["pixel_size"][0]):
        return None, None
    (here, shown), model_px = compared, trained["pixel_size"][0]
    return (px * model_px / here, f"read at the model's {model_px:.3g} {trained['units']} pixels, resampled from "
                                  f"the input's {shown} (--resolution native keeps them)")


def _against_model(reader: Reader, trained: dict, ground: float | None) -> tuple[float, str] | None:
    """The input's pixel size measured as the model's recorded one is (ground metres; a model that
    recorded another unit: in it) and how to say it; None where the two cannot be compared."""
    if not trained.get("pixel_size"):
        return None
    px, units, model_units = abs(reader.georef.transform.a), _units(reader), trained.get("units")
    if model_units == "metre" and ground is not None:
        return ground, _size(reader, ground)
    if model_units == units:
        return px, f"{px:.3g} {units}"
    return None


def _far(size: float, model_px: float) -> bool:
    return not 1 / PIXEL_SIZE_TOLERANCE <= size / model_px <= PIXEL_SIZE_TOLERANCE


def ground_pixel(reader: Reader) -> float | None:
    """The input's ground pixel size in metres at its centre (the mean of across and down, as a
    square pixel would have), or None where it cannot be measured (`vector.areas.Ground`)."""
    sizes = Ground(reader.georef, reader.width, reader.height).pixel_metres()
    return None if sizes is None else math.sqrt(sizes[0] * sizes[1])


def _units(reader: Reader) -> str:
    crs = reader.georef.crs
    return "degree" if crs.is_geographic else (crs.linear_units or "unknown")


def _size(reader: Reader, ground: float) -> str:
    """`0.5 metre`, or `0.0707 m (0.1 metre in its CRS)` where the CRS's unit is not a ground metre."""
    px, units = abs(reader.georef.transform.a), _units(reader)
    if units == "metre" and math.isclose(px, ground, rel_tol=0.005):
        return f"{px:.3g} metre"
    return f"{ground:.3g} m ({px:.3g} {units} in its CRS)"


def _differences(reader: Reader, trained: dict, stretched_by_user: bool = False,
                 ground: float | None = None) -> list[str]:
    """Warnings (said once per file, starting `warning:`) where the input is far from the imagery
    the model learned from: a single band repeated into a colour model, values that are not 8-bit
    for a model of 8-bit imagery, ground pixels of another size."""
    notes = []
    if reader.plan.replicate > 1:
        notes.append(f"warning: the input has 1 band, the model was trained on {reader.plan.replicate}-band "
                     f"imagery: the band repeated into {reader.plan.replicate} is not what it learned from and "
                     f"the masks will likely be poor; use a model trained on such data (bigseg train --bands 1)")
    eight_bit = trained.get("eight_bit", not trained)  # no input description: a model of 8-bit photographs
    if eight_bit and reader.dtype != np.uint8 and trained.get("value_range") is None and reader.plan.palette is None:
        how = "by your --value-range" if stretched_by_user else "by their own 2nd to 98th percentiles"
        notes.append(f"warning: the input's values are {reader.dtype}, stretched to 0..255 {how}; the model "
                     f"learned from 8-bit imagery, so colours may not match what it knows: a --value-range "
                     f"LOW,HIGH that gives the input the look of its training images helps")
    g = reader.georef
    compared = _against_model(reader, trained, ground) if g is not None and g.mapped and not reader.resampled else None
    if compared is not None and _far(compared[0], trained["pixel_size"][0]):
        (size, shown), model_px = compared, trained["pixel_size"][0]
        notes.append(f"warning: the input's pixels are {shown}, the model was trained on "
                     f"{model_px:.3g} {trained['units']}: objects look {model_px / size:.2g}x their trained size; "
                     f"--resolution model reads it at the model's pixel size")
    return notes
