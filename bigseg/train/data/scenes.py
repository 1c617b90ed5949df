"""Raster scenes as training data: an image raster of any size and band count, its labels (a
label raster or a vector layer) and an optional area of interest, read window by window.

The image is read through `bigseg.io.readers` exactly as `predict` reads it (band choice, value
range, nodata, alpha and masks). A pixel is labelled only where the labels say so, the image has
data and, given an area of interest, inside it; elsewhere it is IGNORE. Files are opened lazily
in the process that reads (each data worker opens its own), a few scenes at a time.
"""
from __future__ import annotations

import os
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bigseg.errors import BigsegError, DatasetError
from bigseg.tiling.geometry import Window
from bigseg.io.categories import category_names
from bigseg.io.readers import Reader, open_raster
from bigseg.vector.areas import Ground
from bigseg.train.data.classes import IGNORE, ClassTable, table_from_values
from bigseg.train.data.labels import (
    VECTOR_SUFFIXES,
    AreaOfInterest,
    Grid,
    RasterLabels,
    VectorLabels,
    VectorLayer,
)
from bigseg.train.data.samplers import RandomWindows, SamplerOptions
from bigseg.train.data.source import Patch, Region, Source, as_model_input, region_windows

OPEN_SCENES = 8      # image readers a process keeps open at once
SCAN_SIDE = 2048     # window side of the passes over whole label rasters


@dataclass(frozen=True)
class Scene:
    """One image raster with its labels (label raster or vector file), an optional split name and
    an optional area-of-interest vector file."""

    image: Path
    labels: Path
    split: str | None = None
    aoi: Path | None = None

    @property
    def vector(self) -> bool:
        return self.labels.suffix.lower() in VECTOR_SUFFIXES


@dataclass(frozen=True)
class ReadSettings:
    """How scenes are read: 1-based `bands` of every image (None: all image bands), a fixed
    `value_range` for non-8-bit data, the vector labels' `class_field` and `layer`."""

    bands: tuple[int, ...] | None = None
    value_range: tuple[float, float] | None = None
    class_field: str | None = None
    layer: str | None = None


@dataclass
class SceneInfo:
    """What opening a scene's image told: its grid, whether its data is 8-bit used as stored,
    its ground pixel size (metres, measured on the ground where the CRS allows) and its unit."""

    grid: Grid
    eight_bit: bool
    pixel_size: tuple[float, float] | None
    units: str | None
    band_indexes: tuple[int, ...]


class SceneSource(Source):
    """Raster scenes with one class table. `notes` says once what was decided for all of them."""

    def __init__(self, name: str, scenes: list[Scene], settings: ReadSettings, table: ClassTable | None):
        if not scenes:
            raise DatasetError(f"{name}: no scenes")
        self.name, self.scenes, self.settings = name, list(scenes), settings
        self.notes: list[str] = []
        self.info = self._open_images()
        self.channels = self._channels
        layers = self._vector_layers()
        self.table = table or self._derived_table(layers)
        self.labels = [self._label_source(s, info, layers) for s, info in zip(self.scenes, self.info)]
        self.aois = [AreaOfInterest(s.aoi, info.grid) if s.aoi else None for s, info in zip(self.scenes, self.info)]
        self._lut = self.table.lut()
        self._open: OrderedDict[int, Reader] = OrderedDict()
        self._pid = os.getpid()

    # --- setup (main process, once) -----------------------------------------------------------

    def _open_images(self) -> list[SceneInfo]:
        infos, wanted = [], None
        for scene in self.scenes:
            try:
                with self._reader(scene, wanted) as reader:
                    if wanted is None:
                        wanted = self._channels = reader.channels
                        self.notes += reader.notes
                    infos.append(_info(reader))
            except BigsegError as e:
                raise DatasetError(f"scene {scene.image.name}: {e}") from None
        return infos

    def _reader(self, scene: Scene, wanted: int | None) -> Reader:
        s = self.settings
        return open_raster(scene.image, wanted, s.bands, s.value_range)

    def _vector_layers(self) -> dict[Path, VectorLayer]:
        s = self.settings
        layers = {p: VectorLayer.read(p, s.layer, s.class_field) for p in sorted({sc.labels for sc in self.scenes
                                                                                 if sc.vector})}
        for layer in layers.values():
            if layer.repaired:
                self._note(f"{layer.path.name}: {layer.repaired} invalid polygon(s) (self-intersecting rings and "
                           f"the like) repaired with make_valid: the same area, split where a ring crosses itself")
        return layers

    def _derived_table(self, layers: dict[Path, VectorLayer]) -> ClassTable:
        """Without classes.csv: vector labels give background + the class field's values (or the
        layer's name); label rasters give the values they hold, coloured by their colour table."""
        if layers and len(layers) == len({s.labels for s in self.scenes}):
            values = sorted({str(v) for layer in layers.values() if layer.field_values is not None
                             for v in layer.field_values})
            names = values or [next(iter(layers)).stem]
            from bigseg.palette import default_palette

            palette = default_palette(len(names) + 1)
            return ClassTable(("background", *names), tuple(tuple(c) for c in palette), tuple(range(len(names) + 1)),
                              (IGNORE,), "error", "the vector labels (no classes.csv: background and "
                              + (f"the values of {self.settings.class_field!r})" if values else "the layer's name)"))
        if layers:
            raise DatasetError("scenes mix label rasters and vector labels without a classes.csv; add one")
        values: set[int] = set()
        colormap = None
        for scene, info in zip(self.scenes, self.info):
            labels = RasterLabels(scene.labels, info.grid)
            colormap = colormap or labels.colormap
            for window in region_windows(Window(0, 0, info.grid.width, info.grid.height), SCAN_SIDE):
                raw, labelled = labels.read(window)
                values.update(np.unique(raw[labelled]).tolist())
            labels.close()
        table = table_from_values(sorted(int(v) for v in values), colormap, str(self.scenes[0].labels.parent),
                                  category_names(self.scenes[0].labels))
        self.notes.append(f"no classes.csv: the classes are the label values found ({', '.join(map(str, table.codes))})")
        return table

    def _label_source(self, scene: Scene, info: SceneInfo, layers: dict[Path, VectorLayer]):
        if not scene.vector:
            return RasterLabels(scene.labels, info.grid)
        layer = layers[scene.labels]
        values = self._polygon_values(layer)
        background = next((c for n, c in zip(self.table.names, self.table.codes) if n.lower() == "background"), None)
        if background is None:
            self._note("pixels no polygon covers are unlabelled (the class table has no class named background)")
        elif scene.aoi is None:
            self._note("without an area of interest, pixels outside the polygons' extent are unlabelled")
        return VectorLabels(layer, info.grid, values, background, extent_only=scene.aoi is None)

    def _polygon_values(self, layer: VectorLayer) -> np.ndarray:
        """The class value of each polygon: its class field as a value or a class name; without a
        class field, the one class that is not background."""
        t = self.table
        if layer.field_values is None:
            named = [c for n, c in zip(t.names, t.codes) if n.lower() != "background"]
            if len(named) != 1:
                raise DatasetError(f"{layer.path}: the class table has {len(named)} classes besides background; "
                                   f"name the field that holds each polygon's class with --class-field")
            return np.full(len(layer.wkb), named[0], np.int64)
        by_text = {**{str(c): c for c in t.codes}, **{n: c for n, c in zip(t.names, t.codes)}}
        out = np.empty(len(layer.field_values), np.int64)
        for i, v in enumerate(layer.field_values):
            key = str(int(v)) if isinstance(v, (int, np.integer)) or (isinstance(v, float) and float(v).is_integer()) \
                else str(v)
            if key not in by_text:
                raise DatasetError(f"{layer.path}: {layer.field} = {v!r} is in no class table ({t.source}); "
                                   f"add it to classes.csv")
            out[i] = by_text[key]
        return out

    def _note(self, text: str) -> None:
        if text not in self.notes:
            self.notes.append(text)

    # --- reading (any process) ------------------------------------------------------------------

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_open": OrderedDict()}

    def sampler(self, regions: list[Region], options: SamplerOptions) -> tuple[RandomWindows, list[str]]:
        """Random windows of the regions' labelled areas, with what to note of them."""
        sampler = RandomWindows(self, regions, 1, options.align, options.rare_classes, len(self.classes),
                                options.scene_balance)
        sampler.per_epoch = options.per_epoch or max(options.at_least, round(sampler.labelled / options.crop ** 2))
        notes = []
        if options.scene_balance and sampler.class_probabilities is None:
            notes.append(f"scene balance {options.scene_balance:g}: windows from " + ", ".join(
                f"{Path(self.item_id(item)).stem} {p:.0%}" for item, p in sampler.scene_shares().items()))
        if sampler.class_probabilities is not None:
            notes.append("rare-class sampling: windows centred on " + ", ".join(
                f"{name} {p:.0%}" for name, p in zip(self.classes, sampler.class_probabilities)))
        return sampler, notes

    def input_description(self, regions: list[Region], value_range: tuple[float, float] | None) -> dict:
        """The bands, the ground pixel size and the label values of the classes, as the first
        training scene gives them (the notes say if others differ)."""
        info = self.info[regions[0].item]
        return {"bands": list(info.band_indexes), "value_range": list(value_range) if value_range else None,
                "pixel_size": list(info.pixel_size) if info.pixel_size else None, "units": info.units,
                "eight_bit": bool(info.eight_bit), "label_values": list(self.table.codes)}

    def __len__(self) -> int:
        return len(self.scenes)

    def item_id(self, i: int) -> str:
        return str(self.scenes[i].image.resolve())

    def size(self, i: int) -> tuple[int, int]:
        g = self.info[i].grid
        return g.width, g.height

    def reader(self, i: int) -> Reader:
        """Scene `i`'s image reader, opened on first use in this process (a few kept open). A data
        worker forked from the process that opened it gets its own: two processes reading through
        one file descriptor would move each other's file offsets."""
        if self._pid != os.getpid():
            self._open, self._pid = OrderedDict(), os.getpid()
        if i in self._open:
            self._open.move_to_end(i)
            return self._open[i]
        reader = self._reader(self.scenes[i], self.channels)
        self._open[i] = reader
        while len(self._open) > OPEN_SCENES:
            self._open.popitem(last=False)[1].close()
        return reader

    def read(self, i: int, window: Window | None = None) -> Patch:
        window = window or Window(0, 0, *self.size(i))
        data, valid = self.reader(i).read(window)
        image = as_model_input(data, self.info[i].eight_bit)
        return Patch(image, self._label(i, window, valid), valid)

    def empty(self, i: int, window: Window) -> bool:
        return self.reader(i).empty(window)

    def read_label(self, i: int, window: Window | None = None) -> np.ndarray:
        window = window or Window(0, 0, *self.size(i))
        return self._label(i, window, self.reader(i).validity(window))

    def _label(self, i: int, window: Window, valid: np.ndarray) -> np.ndarray:
        raw, labelled = self.labels[i].read(window)
        labelled &= valid
        if self.aois[i] is not None:
            labelled &= self.aois[i].inside(window)
        label = np.full(raw.shape, IGNORE, np.uint8)
        label[labelled] = self.table.map(raw[labelled], str(self.scenes[i].labels), self._lut)
        return label

    def close(self) -> None:
        for reader in self._open.values():
            reader.close()
        self._open.clear()
        for labels in self.labels:
            labels.close()


def _info(reader: Reader) -> SceneInfo:
    g = reader.georef
    grid = Grid(reader.width, reader.height, g.crs if g else None, g.transform if g and g.crs else None)
    pixel, units = None, None
    if grid.georeferenced:  # on the ground where the CRS allows (Web Mercator's or degrees are not)
        ground = Ground(g, reader.width, reader.height).pixel_metres()
        t = grid.transform
        pixel, units = (ground, "metre") if ground is not None else (
            (abs(t.a), abs(t.e)), grid.crs.linear_units or "unknown")
    return SceneInfo(grid, reader.dtype == np.uint8 and reader.scale is None, pixel, units, tuple(reader.plan.indexes))


__all__ = ["ReadSettings", "Scene", "SceneInfo", "SceneSource"]
