"""An input opened for a model: the bands, value range and pixel size the model was trained on
(stored in checkpoints trained on raster scenes) applied where the user chose none, and a note
where the input is far from what the model knows."""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np

from bigseg.infer.card import ModelCard
from bigseg.io.readers import Reader, ReadOptions, open_input


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
    warnings = _differences(reader, trained, read.value_range is not None)
    if reader.plan.replicate > 1:  # the warning says it, and what follows from it
        reader.notes = [n for n in reader.notes if not n.startswith("single band repeated")]
    reader.notes.extend(warnings)
    return reader


def _differences(reader: Reader, trained: dict, stretched_by_user: bool = False) -> list[str]:
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
    model_px, units = trained.get("pixel_size"), trained.get("units")
    g = reader.georef
    if model_px and g is not None and g.crs is not None and g.transform is not None:
        px = abs(g.transform.a)
        here = "degree" if g.crs.is_geographic else (g.crs.linear_units or "unknown")
        if here == units and not (1 / PIXEL_SIZE_TOLERANCE <= px / model_px[0] <= PIXEL_SIZE_TOLERANCE):
            notes.append(f"warning: the input's pixels are {px:.3g} {units}, the model was trained on "
                         f"{model_px[0]:.3g} {units}: objects look {px / model_px[0]:.2g}x their trained size; "
                         f"resample the input or try --scales {px / model_px[0]:.2g}")
    return notes
