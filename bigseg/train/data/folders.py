"""Folders of small labelled images in the street-scene layouts: Cityscapes and CamVid (the
SegNet release). Each item is one image read whole; the augmentation scales and crops it."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bigseg.errors import DatasetError, RasterFormatError
from bigseg.tiling.geometry import Window
from bigseg.io.readers import open_raster
from bigseg.train.data.classes import IGNORE, ClassTable, fixed_table
from bigseg.train.data.images import ImageSource
from bigseg.train.data.source import Patch, as_model_input

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")

CAMVID_CLASSES = ["sky", "building", "pole", "road", "sidewalk", "tree", "sign", "fence", "car",
                  "pedestrian", "bicyclist"]
CAMVID_PALETTE = [[128, 128, 128], [128, 0, 0], [192, 192, 128], [128, 64, 128], [60, 40, 222],
                  [128, 128, 0], [192, 128, 128], [64, 64, 128], [64, 0, 128], [64, 64, 0], [0, 128, 192]]

CITYSCAPES_CLASSES = ["road", "sidewalk", "building", "wall", "fence", "pole", "traffic light",
                      "traffic sign", "vegetation", "terrain", "sky", "person", "rider", "car", "truck",
                      "bus", "train", "motorcycle", "bicycle"]
CITYSCAPES_PALETTE = [[128, 64, 128], [244, 35, 232], [70, 70, 70], [102, 102, 156], [190, 153, 153],
                      [153, 153, 153], [250, 170, 30], [220, 220, 0], [107, 142, 35], [152, 251, 152],
                      [70, 130, 180], [220, 20, 60], [255, 0, 0], [0, 0, 142], [0, 0, 70], [0, 60, 100],
                      [0, 80, 100], [0, 0, 230], [119, 11, 32]]
# The official cityscapesScripts table: label id of each train id (everything else is ignored).
CITYSCAPES_LABEL_IDS = [7, 8, 11, 12, 13, 17, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 31, 32, 33]


@dataclass(frozen=True)
class Pair:
    image: Path
    label: Path


class ImageFolder(ImageSource):
    """Labelled images read whole: RGB through `bigseg.io.readers` (as predict reads them),
    labels as single-channel value PNGs mapped through the data set's class table."""

    channels = 3

    def __init__(self, name: str, pairs: list[Pair], table: ClassTable):
        self.name, self.pairs, self.table = name, pairs, table
        self._cache: tuple[int, Patch] | None = None  # the last image read: windows of it come from memory

    def __len__(self) -> int:
        return len(self.pairs)

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_cache": None}

    def item_id(self, i: int) -> str:
        return str(self.pairs[i].image.resolve())

    def size(self, i: int) -> tuple[int, int]:
        label = self.read_label(i)
        return label.shape[1], label.shape[0]

    def read(self, i: int, window: Window | None = None) -> Patch:
        if self._cache is None or self._cache[0] != i:
            pair = self.pairs[i]
            try:
                with open_raster(pair.image, 3) as reader:
                    data, valid = reader.read(Window(0, 0, reader.width, reader.height))
                    image = as_model_input(data, reader.dtype == np.uint8 and reader.scale is None)
            except RasterFormatError as e:
                raise DatasetError(str(e)) from None
            label = self.read_label(i)
            if label.shape != image.shape[1:]:
                raise DatasetError(f"{pair.label}: label size {label.shape} differs from image {image.shape[1:]}")
            label[~valid] = IGNORE
            self._cache = (i, Patch(image, label, valid))
        patch = self._cache[1]
        if window is None:
            return Patch(patch.image.copy(), patch.label.copy(), patch.valid.copy())
        rows, cols = window.slices
        return Patch(patch.image[:, rows, cols].copy(), patch.label[rows, cols].copy(), patch.valid[rows, cols].copy())

    def read_label(self, i: int, window: Window | None = None) -> np.ndarray:
        import cv2

        path = self.pairs[i].label
        raw = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
        if raw is None:
            raise DatasetError(f"cannot decode {path}")
        if raw.ndim == 3:
            raise DatasetError(f"{path}: labels must be single-channel class indices")
        label = self.table.map(raw, str(path))
        return label if window is None else label[window.slices].copy()


def image_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith("."))


def pair_by_stem(images: list[Path], label_dir: Path) -> list[Pair]:
    labels = {p.stem: p for p in image_files(label_dir)}
    missing = [p.name for p in images if p.stem not in labels]
    if missing:
        raise DatasetError(f"{label_dir}: no label for {len(missing)} image(s), e.g. {missing[0]}")
    return [Pair(p, labels[p.stem]) for p in images]


def is_camvid(root: Path) -> bool:
    return any((root / s).is_dir() and (root / f"{s}annot").is_dir() for s in ("train", "val", "test"))


def is_cityscapes(root: Path) -> bool:
    return (root / "leftImg8bit").is_dir() and (root / "gtFine").is_dir()


def camvid(root: Path, split: str) -> ImageFolder:
    images_dir, labels_dir = root / split, root / f"{split}annot"
    if not images_dir.is_dir() or not labels_dir.is_dir():
        raise DatasetError(f"{root}: CamVid split {split!r} needs {split}/ and {split}annot/")
    images = image_files(images_dir)
    if not images:
        raise DatasetError(f"{images_dir}: no images")
    table = fixed_table(CAMVID_CLASSES, CAMVID_PALETTE, list(range(11)), "CamVid (11 = void)")
    return ImageFolder("camvid", pair_by_stem(images, labels_dir), table)


def cityscapes(root: Path, split: str) -> ImageFolder:
    images_dir = root / "leftImg8bit" / split
    if not images_dir.is_dir():
        raise DatasetError(f"{root}: Cityscapes split {split!r} not found (leftImg8bit/{split}/)")
    images = sorted(images_dir.rglob("*_leftImg8bit.png"))
    if not images:
        raise DatasetError(f"{images_dir}: no *_leftImg8bit.png images")
    pairs, use_train_ids = [], None
    for image in images:
        base = root / "gtFine" / split / image.parent.name / image.name.replace("_leftImg8bit.png", "_gtFine_")
        train_ids = Path(str(base) + "labelTrainIds.png")
        label_ids = Path(str(base) + "labelIds.png")
        has_train = train_ids.is_file()
        if use_train_ids is None:
            use_train_ids = has_train
        label = train_ids if (use_train_ids and has_train) else label_ids
        if not label.is_file():
            raise DatasetError(f"no gtFine labels for {image.name} (looked for {label.name})")
        pairs.append(Pair(image, label))
    codes = list(range(19)) if use_train_ids else CITYSCAPES_LABEL_IDS
    table = fixed_table(CITYSCAPES_CLASSES, CITYSCAPES_PALETTE, codes,
                        "Cityscapes " + ("train ids" if use_train_ids else "label ids"))
    return ImageFolder("cityscapes", pairs, table)
