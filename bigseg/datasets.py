"""Data folders recognised by layout: Cityscapes, CamVid (SegNet release) and a generic one.

Every dataset yields (RGB uint8 image (H, W, 3), label uint8 (H, W)) with 255 = ignore, and knows
its class names and palette.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bigseg.errors import DatasetError
from bigseg.palette import default_palette

IGNORE = 255
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
# The official cityscapesScripts table: label id -> train id (everything else is ignored).
CITYSCAPES_ID_TO_TRAIN = {7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9, 23: 10,
                          24: 11, 25: 12, 26: 13, 27: 14, 28: 15, 31: 16, 32: 17, 33: 18}

LAYOUTS = ("Cityscapes (leftImg8bit/ + gtFine/), CamVid (train/ + trainannot/, val/ + valannot/, "
           "test/ + testannot/), generic (images/ + masks/ + classes.json)")


@dataclass(frozen=True)
class Sample:
    image: Path
    label: Path


class SegmentationDataset:
    """A list of (image, label) files with a label decoder; `[i]` returns (image RGB, label)."""

    def __init__(self, name: str, samples: list[Sample], classes: list[str], palette: list[list[int]],
                 lut: np.ndarray | None = None):
        self.name, self.samples, self.classes, self.palette = name, samples, classes, palette
        self.lut = lut  # uint8[256]: raw label value -> class index or IGNORE

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        import cv2

        s = self.samples[i]
        image = cv2.imread(str(s.image), cv2.IMREAD_COLOR)
        if image is None:
            raise DatasetError(f"cannot decode {s.image}")
        label = self.label(i)
        if label.shape != image.shape[:2]:
            raise DatasetError(f"{s.label}: label size {label.shape} differs from image {image.shape[:2]}")
        return image[..., ::-1].copy(), label

    def label(self, i: int) -> np.ndarray:
        """The class-index label map of sample `i` (IGNORE where unlabelled)."""
        import cv2

        s = self.samples[i]
        label = cv2.imread(str(s.label), cv2.IMREAD_UNCHANGED)
        if label is None:
            raise DatasetError(f"cannot decode {s.label}")
        if label.ndim == 3:
            raise DatasetError(f"{s.label}: labels must be single-channel class indices")
        return label if self.lut is None else self.lut[label]


def label_statistics(dataset: SegmentationDataset) -> tuple[np.ndarray, np.ndarray]:
    """Pixels per class over all labels, and per class the labelled pixels of the images where
    it appears (the two counts class balancing needs); ignore is left out of both."""
    n = len(dataset.classes)
    pixels = np.zeros(n, np.int64)
    image_pixels = np.zeros(n, np.int64)
    for i in range(len(dataset)):
        counts = np.bincount(dataset.label(i).ravel(), minlength=256)[:n]
        pixels += counts
        image_pixels += np.where(counts > 0, counts.sum(), 0)
    return pixels, image_pixels


def _lut(mapping: dict[int, int]) -> np.ndarray:
    lut = np.full(256, IGNORE, np.uint8)
    for k, v in mapping.items():
        lut[k] = v
    return lut


def _images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)


def _pair(images: list[Path], label_dir: Path, where: str) -> list[Sample]:
    labels = {p.stem: p for p in _images(label_dir)}
    missing = [p.name for p in images if p.stem not in labels]
    if missing:
        raise DatasetError(f"{where}: no label for {len(missing)} image(s), e.g. {missing[0]}")
    return [Sample(p, labels[p.stem]) for p in images]


def split_names(split: str) -> list[str]:
    """`train+val` -> ["train", "val"]: a split may join several of the folder's splits."""
    names = [s.strip() for s in split.split("+")]
    if not all(names) or len(set(names)) != len(names):
        raise DatasetError(f"split {split!r}: expected a split name or names joined by '+', e.g. train+val")
    return names


def open_dataset(root: str | Path, split: str) -> SegmentationDataset:
    """Recognise the layout of `root` and return its `split` (train, val or test), or several
    splits joined in order (`train+val`)."""
    names = split_names(split)
    if len(names) > 1:
        parts = [open_dataset(root, name) for name in names]
        first, samples = parts[0], [s for p in parts for s in p.samples]
        if len({s.image for s in samples}) != len(samples):
            raise DatasetError(f"{root}: the splits in {split!r} share images (a folder without split "
                               f"folders has one validation set for every name but train)")
        return SegmentationDataset(first.name, samples, first.classes, first.palette, first.lut)
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"data folder not found: {root}")
    if (root / "leftImg8bit").is_dir() and (root / "gtFine").is_dir():
        return _cityscapes(root, split)
    if any((root / s).is_dir() and (root / f"{s}annot").is_dir() for s in ("train", "val", "test")):
        return _camvid(root, split)  # an evaluation folder may hold only test/ + testannot/
    if (root / "images").is_dir() and (root / "masks").is_dir():
        return _generic(root, split)
    raise DatasetError(f"{root}: unknown data layout; expected one of: {LAYOUTS}")


def _camvid(root: Path, split: str) -> SegmentationDataset:
    images_dir, labels_dir = root / split, root / f"{split}annot"
    if not images_dir.is_dir() or not labels_dir.is_dir():
        raise DatasetError(f"{root}: CamVid split {split!r} needs {split}/ and {split}annot/")
    images = _images(images_dir)
    if not images:
        raise DatasetError(f"{images_dir}: no images")
    return SegmentationDataset("camvid", _pair(images, labels_dir, str(labels_dir)), CAMVID_CLASSES,
                               CAMVID_PALETTE, _lut({i: i for i in range(11)}))  # 11 = void -> ignore


def _cityscapes(root: Path, split: str) -> SegmentationDataset:
    images_dir = root / "leftImg8bit" / split
    if not images_dir.is_dir():
        raise DatasetError(f"{root}: Cityscapes split {split!r} not found (leftImg8bit/{split}/)")
    images = sorted(images_dir.rglob("*_leftImg8bit.png"))
    if not images:
        raise DatasetError(f"{images_dir}: no *_leftImg8bit.png images")
    samples, use_train_ids = [], None
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
        samples.append(Sample(image, label))
    lut = _lut({i: i for i in range(19)}) if use_train_ids else _lut(CITYSCAPES_ID_TO_TRAIN)
    return SegmentationDataset("cityscapes", samples, CITYSCAPES_CLASSES, CITYSCAPES_PALETTE, lut)


def _generic(root: Path, split: str) -> SegmentationDataset:
    """images/ + masks/ (same stems) + classes.json: {"classes": [...], "palette": [[r,g,b], ...],
    "ignore": [values]}. Splits come from images/<split>/ when present; otherwise every 10th
    image (sorted by name) is validation and the rest training."""
    spec_path = root / "classes.json"
    if not spec_path.is_file():
        raise DatasetError(f"{root}: generic layout needs classes.json with class names (and colours)")
    try:
        spec = json.loads(spec_path.read_text())
        classes = list(spec["classes"])
    except (ValueError, KeyError, TypeError) as e:
        raise DatasetError(f"{spec_path}: expected {{\"classes\": [...], \"palette\": [...]}} ({e})") from None
    palette = [list(c) for c in spec.get("palette", default_palette(len(classes)))]
    if (root / "images" / split).is_dir():
        images = _images(root / "images" / split)
        masks = root / "masks" / split
    else:
        every = _images(root / "images")
        images = [p for i, p in enumerate(every) if (i % 10 == 9) == (split != "train")]
        masks = root / "masks"
    if not images:
        raise DatasetError(f"{root}: no images for split {split!r}")
    mapping = {i: i for i in range(len(classes))}
    for v in spec.get("ignore", []):
        mapping.pop(int(v), None)
    return SegmentationDataset("generic", _pair(images, masks, str(masks)), classes, palette, _lut(mapping))
