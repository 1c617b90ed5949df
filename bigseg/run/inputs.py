"""An input opened for a model: the bands, value range and pixel size the model was trained on
(stored in checkpoints trained on raster scenes) applied where the user chose none, and a note
where the input is far from what the model knows."""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

from bigseg.io.readers import Reader, ReadOptions, open_input

if TYPE_CHECKING:  # anything with a checkpoint's input description: a Checkpoint or an exported model's card
    from bigseg.checkpoint import Checkpoint

PIXEL_SIZE_TOLERANCE = 1.5  # a ground pixel this many times larger or smaller than the model's is noted


def open_for_model(src: Path, checkpoint: Checkpoint, read: ReadOptions) -> Reader:
    """`open_input` with the model's own band list and value range as defaults (the user's
    `--bands` and `--value-range` win), and notes on a band count or pixel size far from the model's."""
    trained = checkpoint.input
    if read.bands is None and trained.get("bands") and trained["bands"] != list(range(1, checkpoint.in_channels + 1)):
        read = replace(read, bands=tuple(trained["bands"]))
    if read.value_range is None and trained.get("value_range"):
        read = replace(read, value_range=tuple(trained["value_range"]))
    reader = open_input(src, checkpoint.in_channels, read)
    reader.notes.extend(_differences(reader, trained))
    return reader


def _differences(reader: Reader, trained: dict) -> list[str]:
    notes = []
    model_px, units = trained.get("pixel_size"), trained.get("units")
    g = reader.georef
    if model_px and g is not None and g.crs is not None and g.transform is not None:
        px = abs(g.transform.a)
        here = "degree" if g.crs.is_geographic else (g.crs.linear_units or "unknown")
        if here == units and not (1 / PIXEL_SIZE_TOLERANCE <= px / model_px[0] <= PIXEL_SIZE_TOLERANCE):
            notes.append(f"the input's pixels are {px:.3g} {units}, the model was trained on {model_px[0]:.3g} "
                         f"{units}: results may suffer; resample the input or try --scales {px / model_px[0]:.2g}")
    return notes
