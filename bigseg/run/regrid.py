"""A job read at the model's pixel size (`--resolution`) writes its outputs back on the input's grid:
the prediction on the model's grid (a hidden, journaled mask and probabilities beside the output)
is resampled onto the input's grid strip by strip by GDAL's warper (labels nearest, probabilities
bilinear) into the job's real outputs, so the polygons, areas and overlay are those of the input's
grid, and the input's own validity sets the nodata at its full resolution. The hidden files go
once the outputs are committed."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from bigseg.atomic import remove
from bigseg.infer.predictor import Predictor
from bigseg.io.outputs import OutputSet, WriteOptions
from bigseg.io.readers import ReadOptions
from bigseg.palette import NODATA
from bigseg.run.inputs import open_for_model
from bigseg.tiling.geometry import Window

ROWS = 512  # rows resampled and written at a time


def model_grid_path(dst: Path) -> Path:
    """The hidden mask of a job predicted on the model's grid: `.NAME.model-grid.tif` beside `dst`."""
    return dst.with_name(f".{dst.stem}.model-grid.tif")


def hidden_files(dst: Path) -> list[Path]:
    """Every file the hidden job writes (mask, its GIS sidecars, probabilities)."""
    mask = model_grid_path(dst)
    probs = mask.with_name(mask.name.replace(".tif", ".probs.tif"))
    return [mask, mask.with_name(mask.name + ".aux.xml"), mask.with_suffix(".qml"), probs]


def onto_input_grid(predictor: Predictor, src: Path, dst: Path, read: ReadOptions, write: WriteOptions
                    ) -> tuple[OutputSet, int, int]:
    """Resample the hidden prediction of `dst` onto `src`'s grid (as `read` frames it, without
    resampling) into the outputs `write` asks for; returns them committed, and the grid's size."""
    import rasterio
    from rasterio.enums import Resampling
    from rasterio.vrt import WarpedVRT

    card = predictor.card
    mask_file, _, _, probs_file = hidden_files(dst)
    with open_for_model(src, card, _native(read)) as reader, rasterio.open(mask_file) as mask_ds:
        grid = dict(crs=reader.georef.crs, transform=reader.georef.transform, width=reader.width,
                    height=reader.height)
        labels_view = WarpedVRT(mask_ds, resampling=Resampling.nearest, nodata=NODATA, **grid)
        probs_ds = rasterio.open(probs_file) if write.probs else None
        probs_view = None if probs_ds is None else WarpedVRT(probs_ds, resampling=Resampling.bilinear, **grid)
        try:
            outputs = OutputSet.create(dst, reader.kind, reader.width, reader.height, reader.georef, card.classes,
                                       card.palette, write)
            with outputs:
                for top in range(0, reader.height, ROWS):
                    _strip(reader, outputs, labels_view, probs_view, Window(0, top, reader.width,
                                                                            min(ROWS, reader.height - top)))
        finally:
            labels_view.close()
            if probs_ds is not None:
                probs_view.close()
                probs_ds.close()
    for path in hidden_files(dst):
        remove(path)
    return outputs, reader.width, reader.height


def _strip(reader, outputs: OutputSet, labels_view, probs_view, window: Window) -> None:
    from rasterio.windows import Window as RWindow

    w = RWindow(window.col_off, window.row_off, window.width, window.height)
    for r in outputs.image_rows(window):
        line = Window(0, r, window.width, 1)
        outputs.add_image(line, reader.read(line)[0])
    labels = labels_view.read(1, window=w)
    valid = reader.validity(window) & (labels != NODATA)
    probs = None if probs_view is None else probs_view.read(window=w).astype(np.uint8)
    if not valid.any():
        outputs.write_nodata(window)
    else:
        outputs.write(window, labels, probs, valid)


def _native(read: ReadOptions) -> ReadOptions:
    from dataclasses import replace

    return replace(read, resolution="native")
