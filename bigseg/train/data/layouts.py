"""`--data` recognised by layout, and split into regions. Each layout is registered here
(`register_layout`): how to recognise it and how to open it into splits; its source then says how
its regions are read, sampled and scored (`bigseg.train.data.source.Source`). The layouts:

- Cityscapes (`leftImg8bit/` + `gtFine/`) and CamVid (`train/` + `trainannot/`, ...): image
  folders, one folder per split.
- Raster scenes: a folder with `images/` and `labels/` (label rasters with the images' stems; the
  older name `masks/` too), or `images/` and one vector file of labels (beside `images/` or alone
  in `labels/`); or a scenes file, a CSV with the columns `image,labels[,split][,aoi]` (paths
  relative to it). Classes from `classes.csv` (`value,name,red,green,blue`) in the labels' folder
  or the data folder, or the generic layout's `classes.json`; else from the labels themselves.
  `images/<split>/` (with `labels/<split>/`) gives explicit splits.
"""
from __future__ import annotations

import csv
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Protocol

from bigseg.errors import DatasetError
from bigseg.train.data.classes import ClassTable, read_classes_csv, read_classes_json
from bigseg.train.data.folders import (
    ImageFolder,
    camvid,
    cityscapes,
    image_files,
    is_camvid,
    is_cityscapes,
)
from bigseg.train.data.labels import VECTOR_SUFFIXES
from bigseg.train.data.scenes import ReadSettings, Scene, SceneSource
from bigseg.train.data.source import Region, Source, regions_overlap
from bigseg.train.data.split import SplitSettings, split_scenes

RASTER_SUFFIXES = (".tif", ".tiff", ".vrt", ".img", ".jp2", ".png", ".jpg", ".jpeg", ".bmp", ".gtif")


@dataclass
class DataSplit:
    """The regions of one split (`train`, `val`, `train+val`, ...) and the source they are read from."""

    source: Source
    regions: list[Region]
    split: str

    @property
    def name(self) -> str:
        return self.source.name

    @property
    def classes(self) -> list[str]:
        return self.source.classes

    @property
    def palette(self) -> list[list[int]]:
        return self.source.palette

    def __len__(self) -> int:
        return len(self.regions)


@dataclass(frozen=True)
class DataSettings:
    """How `--data` is read and split (raster scenes; image folders ignore it)."""

    read: ReadSettings = field(default_factory=ReadSettings)
    split: SplitSettings = field(default_factory=SplitSettings)


def split_names(split: str) -> list[str]:
    """`train+val` -> ["train", "val"]: a split may join several of the data's splits."""
    names = [s.strip() for s in split.split("+")]
    if not all(names) or len(set(names)) != len(names):
        raise DatasetError(f"split {split!r}: expected a split name or names joined by '+', e.g. train+val")
    return names


class Splits(Protocol):
    """A `--data` opened by its layout: what to note of it, and the regions of each split."""

    notes: list[str]

    def split(self, names: list[str], split: str) -> DataSplit:
        """The regions of the splits `names` (as the user wrote them: `split`)."""


@dataclass(frozen=True)
class Layout:
    """A kind of `--data`: `recognise(root)` says whether a path is one, `open(root, settings)`
    reads it into `Splits`; `describe` names it where a path is none of the layouts."""

    kind: str
    describe: str
    recognise: Callable[[Path], bool]
    open: Callable[[Path, "DataSettings"], Splits]


LAYOUTS: list[Layout] = []  # tried in order


def register_layout(layout: Layout) -> Layout:
    LAYOUTS.append(layout)
    return layout


def layouts_described() -> str:
    return ", ".join(layout.describe for layout in LAYOUTS)


class DataSet:
    """`--data` opened once by the first layout that recognises it; `split(name)` gives the
    regions of a split."""

    def __init__(self, root: str | Path, settings: DataSettings = DataSettings()):
        self.root = Path(root)
        self.settings = settings
        if not self.root.exists():
            raise DatasetError(f"data not found: {self.root}")
        layout = next((layout for layout in LAYOUTS if layout.recognise(self.root)), None)
        if layout is None:
            raise DatasetError(f"{self.root}: unknown data layout; expected one of: {layouts_described()}")
        self.kind = layout.kind
        self.splits = layout.open(self.root, settings)
        self.notes: list[str] = list(self.splits.notes)

    def split(self, split: str) -> DataSplit:
        return self.splits.split(split_names(split), split)

    def check_disjoint(self, a: DataSplit, b: DataSplit) -> bool:
        """True when the two splits share no pixel."""
        if a.source is b.source:
            return not regions_overlap(a.regions, b.regions)
        return not {a.source.item_id(r.item) for r in a.regions} & {b.source.item_id(r.item) for r in b.regions}


def open_split(root: str | Path, split: str, settings: DataSettings = DataSettings()) -> DataSplit:
    """One split of `root` (for `bigseg eval` and tests)."""
    return DataSet(root, settings).split(split)


class FolderSplits:
    """Image folders, one folder per split (Cityscapes, CamVid): `opener(root, name)` reads one."""

    def __init__(self, root: Path, opener: Callable[[Path, str], ImageFolder]):
        self.root, self.opener, self.notes = root, opener, []

    def split(self, names: list[str], split: str) -> DataSplit:
        parts = [self.opener(self.root, name) for name in names]
        pairs = [p for part in parts for p in part.pairs]
        if len({p.image for p in pairs}) != len(pairs):
            raise DatasetError(f"{self.root}: the splits in {split!r} share images")
        source = parts[0] if len(parts) == 1 else ImageFolder(parts[0].name, pairs, parts[0].table)
        return DataSplit(source, [Region(i) for i in range(len(pairs))], split)


class SceneSplits:
    """Raster scenes, split by the split column or folders, else by the whole-scene rule or blocks
    (`bigseg.train.data.split`)."""

    def __init__(self, root: Path, settings: DataSettings):
        self.root = root
        scenes, table = _scenes(root)
        self.source = SceneSource(root.stem, scenes, settings.read, table)
        sizes = [self.source.size(i) for i in range(len(scenes))]
        self.regions, how = split_scenes([s.image.stem for s in scenes], sizes, [s.split for s in scenes],
                                         settings.split)
        self.notes = [*self.source.notes, how]

    def split(self, names: list[str], split: str) -> DataSplit:
        if names == ["all"] and "all" not in self.regions:  # every scene, whole (to score a model on new data)
            return DataSplit(self.source, [Region(i) for i in range(len(self.source))], split)
        missing = [n for n in names if n not in self.regions]
        if missing:
            raise DatasetError(f"{self.root}: no {missing[0]!r} split (it has: {', '.join(sorted(self.regions))})")
        for n in names:
            if isinstance(self.regions[n], DatasetError):
                raise self.regions[n]
        return DataSplit(self.source, [r for n in names for r in self.regions[n]], split)


register_layout(Layout("cityscapes", "Cityscapes (leftImg8bit/ + gtFine/)",
                       lambda root: root.is_dir() and is_cityscapes(root), lambda root, _: FolderSplits(root, cityscapes)))
register_layout(Layout("camvid", "CamVid (train/ + trainannot/, ...)",
                       lambda root: root.is_dir() and is_camvid(root), lambda root, _: FolderSplits(root, camvid)))
register_layout(Layout("scenes", "raster scenes (images/ + labels/ with the same stems, images/ + one vector file, "
                                 "or a scenes CSV image,labels[,split][,aoi])",
                       lambda root: root.is_file() or (root / "images").is_dir(), SceneSplits))


def _scenes(root: Path) -> tuple[list[Scene], ClassTable | None]:
    if root.is_file():
        if root.suffix.lower() != ".csv":
            raise DatasetError(f"{root}: --data takes a folder or a scenes file (.csv); expected one of: "
                               f"{layouts_described()}")
        scenes = _read_scenes_csv(root)
        return scenes, _class_table(root.parent, scenes)
    images = root / "images"
    labels = next((root / n for n in ("labels", "masks") if (root / n).is_dir()), None)
    if not images.is_dir():
        raise DatasetError(f"{root}: unknown data layout; expected one of: {layouts_described()}")
    vector = _vector_file(root, labels)
    splits = sorted(p.name for p in images.iterdir() if p.is_dir() and not p.name.startswith("."))
    scenes = []
    for split in splits or [None]:
        folder = images / split if split else images
        files = image_files(folder) if split else [p for p in image_files(images) if p.parent == images]
        if vector is not None:
            scenes += [Scene(p, vector, split) for p in files]
            continue
        if labels is None:
            raise DatasetError(f"{root}: images/ needs labels/ (label rasters with the same names) or one vector "
                               f"file of labels beside it")
        scenes += _pair(files, labels / split if split else labels, split)
    if not scenes:
        raise DatasetError(f"{images}: no images")
    return scenes, _class_table(root, scenes)


def _pair(images: list[Path], folder: Path, split: str | None) -> list[Scene]:
    found = {p.stem: p for p in folder.iterdir() if p.suffix.lower() in RASTER_SUFFIXES} if folder.is_dir() else {}
    missing = [p.name for p in images if p.stem not in found]
    if missing:
        raise DatasetError(f"{folder}: no label raster for {len(missing)} image(s), e.g. {missing[0]}")
    return [Scene(p, found[p.stem], split) for p in images]


def _vector_file(root: Path, labels: Path | None) -> Path | None:
    """The one vector file of labels beside images/ (or alone in labels/), if that is the layout."""
    candidates = [p for p in root.iterdir() if p.suffix.lower() in VECTOR_SUFFIXES and p.is_file()]
    if labels is not None and not candidates:
        inside = [p for p in labels.iterdir() if p.is_file()]
        vectors = [p for p in inside if p.suffix.lower() in VECTOR_SUFFIXES]
        if vectors and len(vectors) == len([p for p in inside if p.suffix.lower() != ".csv"
                                            and p.suffix.lower() not in (".prj", ".dbf", ".shx", ".cpg", ".qix")]):
            candidates = vectors
    candidates = [p for p in candidates if p.name != "classes.json"]
    if len(candidates) > 1:
        raise DatasetError(f"{root}: {len(candidates)} vector files ({', '.join(p.name for p in candidates)}); "
                           f"keep one, or list the scenes in a CSV (image,labels)")
    return candidates[0] if candidates else None


def _read_scenes_csv(path: Path) -> list[Scene]:
    try:
        with open(path, newline="") as f:
            rows = [r for r in csv.DictReader(f)]
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise DatasetError(f"{path}: cannot read the scenes file ({e})") from None
    if not rows or not {"image", "labels"} <= {k.strip().lower() for k in rows[0] if k}:
        raise DatasetError(f"{path}: a scenes file is a CSV with the header image,labels[,split][,aoi]")
    scenes = []
    for n, row in enumerate(rows, 2):
        row = {k.strip().lower(): (v or "").strip() for k, v in row.items() if k}
        where = lambda key: (path.parent / row[key]).resolve() if row.get(key) else None
        image, labels = where("image"), where("labels")
        if image is None or labels is None:
            raise DatasetError(f"{path}, line {n}: needs an image and its labels")
        for p in (image, labels, where("aoi")):
            if p is not None and not p.is_file():
                raise DatasetError(f"{path}, line {n}: file not found: {p}")
        scenes.append(Scene(image, labels, row.get("split") or None, where("aoi")))
    return scenes


def _class_table(root: Path, scenes: list[Scene]) -> ClassTable | None:
    """classes.csv beside the labels or in the data folder, or the generic layout's classes.json."""
    for folder in dict.fromkeys([scenes[0].labels.parent, root]):
        if (folder / "classes.csv").is_file():
            return read_classes_csv(folder / "classes.csv", _label_nodata(scenes[0]))
    if (root / "classes.json").is_file():
        return read_classes_json(root / "classes.json")
    return None


def _label_nodata(scene: Scene) -> float | None:
    if scene.vector:
        return None
    import warnings

    import rasterio

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with rasterio.open(scene.labels) as ds:
                return ds.nodata
    except rasterio.errors.RasterioIOError:
        return None  # said when the scene is opened
