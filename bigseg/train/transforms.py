"""Training augmentation as in the ladder/SwiftNet papers: random scale (0.5 to 2), random crop
with ignore padding, horizontal flip, optional photometric jitter, colour cast and tone curve
(gamma), and for imagery seen from above optional quarter turns (`--rotate`).

Each sample draws from its own generator seeded by (seed, epoch, index), so the augmented batch
is the same whatever the number of worker processes and after a resume. A whole image is scaled,
then cropped (`draw`); a window of a raster scene is drawn at the crop's size divided by the
scale, so the scaled window is the crop (`bigseg.train.data.samplers`), and `window_draw` only
resizes it. Images have any number of bands; saturation jitter needs three (RGB).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from bigseg.train.data.classes import IGNORE


@dataclass(frozen=True)
class Augment:
    crop: int = 448
    scale_min: float = 0.5
    scale_max: float = 2.0
    flip: bool = True
    jitter: float = 0.0  # max relative change of brightness, contrast and saturation
    colour: float = 0.0  # max relative change of each channel's gain (white balance, colour cast)
    gamma: float = 0.0  # tone curve: intensities raised to a power in [1 / (1 + gamma), 1 + gamma]
    rotate: bool = False  # a random quarter turn (imagery seen from above has no "up")


def sample_rng(seed: int, epoch: int, index: int) -> np.random.Generator:
    return np.random.default_rng([seed, epoch, index])


@dataclass(frozen=True)
class Draw:
    """One sample's augmentation: its scale and scaled size (w, h), the crop's top-left corner in
    the scaled image (padded with ignore to at least the crop), a flip, the jitter factors
    (brightness, contrast, saturation) or None, the R, G, B gains or None, and the tone curve's
    exponent or None, and the quarter turns (0..3) of the crop."""
    scale: float
    size: tuple[int, int]
    y: int
    x: int
    flip: bool
    jitter: tuple[float, float, float] | None
    gains: tuple[float, float, float] | None = None
    gamma: float | None = None
    turns: int = 0


def draw(aug: Augment, rng: np.random.Generator, height: int, width: int, bands: int = 3) -> Draw:
    """The random choices of one whole image, in the order both augmentation paths use them."""
    s = rng.uniform(aug.scale_min, aug.scale_max)
    size = (max(1, round(width * s)), max(1, round(height * s)))
    y = int(rng.integers(0, max(size[1], aug.crop) - aug.crop + 1))
    x = int(rng.integers(0, max(size[0], aug.crop) - aug.crop + 1))
    return Draw(float(s), size, y, x, *_photometric(aug, rng, bands))


def window_draw(aug: Augment, rng: np.random.Generator, scale: float, height: int, width: int,
                bands: int) -> Draw:
    """The choices for a window already drawn at 1/`scale` of the crop: resized by `scale` (to the
    crop, or smaller where the scene is), never cropped; then the photometric choices."""
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    return Draw(float(scale), size, 0, 0, *_photometric(aug, rng, bands))


def _photometric(aug: Augment, rng: np.random.Generator, bands: int) -> tuple:
    flip = bool(aug.flip and rng.random() < 0.5)
    jitter = tuple(float(v) for v in rng.uniform(1 - aug.jitter, 1 + aug.jitter, 3)) if aug.jitter > 0 else None
    # drawn last, each only when asked for: a run without them draws exactly what it drew before they existed
    gains = tuple(float(v) for v in rng.uniform(1 - aug.colour, 1 + aug.colour, bands)) if aug.colour > 0 else None
    # log-uniform: darkening and brightening as likely (x ** g and x ** (1 / g) equally probable)
    gamma = float(np.exp(rng.uniform(-np.log1p(aug.gamma), np.log1p(aug.gamma)))) if aug.gamma > 0 else None
    turns = int(rng.integers(4)) if aug.rotate else 0  # with the flip: all eight turns and mirrors of a square
    return flip, jitter, gains, gamma, turns


def augment(image: np.ndarray, label: np.ndarray, aug: Augment, rng: np.random.Generator,
            target: np.ndarray | None = None) -> tuple[np.ndarray, ...]:
    """A whole image: (H, W, bands) uint8 or float32 in 0..255 + (H, W) uint8 -> (bands, crop, crop)
    float32 + (crop, crop) int64; with a teacher's (H, W, C) probabilities `target`, also those
    (C, crop, crop) float32, moved with the image (resized, cropped, flipped; zero on padding)."""
    return apply(image, label, aug, draw(aug, rng, *label.shape, image.shape[2]), target)


def apply(image: np.ndarray, label: np.ndarray, aug: Augment, d: Draw,
          target: np.ndarray | None = None) -> tuple[np.ndarray, ...]:
    """`augment` with the choices `d`."""
    import cv2

    h, w = label.shape
    if d.size != (w, h):
        image = resize_image(image, d.size, cv2.INTER_LINEAR if d.scale > 1 else cv2.INTER_AREA)
        label = cv2.resize(label, d.size, interpolation=cv2.INTER_NEAREST)
    if target is not None:
        target = _geometry(target.astype(np.float32), d, aug.crop)
    image = image.astype(np.float32)
    h, w = label.shape
    c = aug.crop
    ph, pw = max(0, c - h), max(0, c - w)
    if ph or pw:  # pad with ignore; the padded image area is never scored
        image = np.pad(image, ((0, ph), (0, pw), (0, 0)))
        label = np.pad(label, ((0, ph), (0, pw)), constant_values=IGNORE)
    image, label = image[d.y:d.y + c, d.x:d.x + c], label[d.y:d.y + c, d.x:d.x + c]
    if d.flip:
        image, label = image[:, ::-1], label[:, ::-1]
    if d.turns:  # crops are square: the shapes stay
        image, label = np.rot90(image, d.turns), np.rot90(label, d.turns)
    if d.jitter is not None:
        image = _jitter(image, d.jitter)
    if d.gains is not None:
        image = np.clip(image * np.array(d.gains, np.float32), 0, 255)
    if d.gamma is not None:
        image = (255 * (image / np.float32(255)) ** np.float32(d.gamma)).astype(np.float32)
    out = np.ascontiguousarray(image.transpose(2, 0, 1)), np.ascontiguousarray(label).astype(np.int64)
    return out if target is None else (*out, target)


def _geometry(target: np.ndarray, d: Draw, crop: int) -> np.ndarray:
    """The draw's resize, crop (zero padding) and flip of (H, W, C) probabilities -> (C, crop, crop)."""
    h, w = target.shape[:2]
    if d.size != (w, h):  # as the image is resized (targets kept smaller, `--teacher-reduction`, grow back here)
        target = resize_channels(target, d.size)
    h, w = target.shape[:2]
    target = np.pad(target, ((0, max(0, crop - h)), (0, max(0, crop - w)), (0, 0)))
    target = target[d.y:d.y + crop, d.x:d.x + crop]
    if d.flip:
        target = target[:, ::-1]
    if d.turns:
        target = np.rot90(target, d.turns)
    return np.ascontiguousarray(target.transpose(2, 0, 1))


def resize_image(image: np.ndarray, size: tuple[int, int], how: int) -> np.ndarray:
    """(H, W, bands) -> (h, w, bands) for `size` (w, h); OpenCV's resize takes up to 4 channels."""
    import cv2

    if image.shape[2] <= 4:
        return cv2.resize(image, size, interpolation=how).reshape(size[1], size[0], -1)
    return np.dstack([cv2.resize(image[..., i:i + 4], size, interpolation=how).reshape(size[1], size[0], -1)
                      for i in range(0, image.shape[2], 4)])


def resize_channels(array: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """(H, W, C) float -> (h, w, C) for `size` (w, h): bilinear to enlarge, area to shrink, as an image
    is resized; OpenCV's area resampling takes at most 4 channels at a time."""
    import cv2

    how = cv2.INTER_LINEAR if size[0] > array.shape[1] else cv2.INTER_AREA
    return resize_image(array, size, how)


def _jitter(image: np.ndarray, factors: tuple[float, float, float]) -> np.ndarray:
    """Brightness, contrast and (RGB images only) saturation."""
    b, c, s = (np.float64(f) for f in factors)  # float64 as drawn: the result is rounded to float32 once
    rgb = image.shape[2] == 3
    gray = image @ np.array([0.299, 0.587, 0.114], np.float32) if rgb else None
    image = image * b
    image = (image - image.mean()) * c + image.mean()
    if rgb:
        image = (image - gray[..., None] * b) * s + gray[..., None] * b
    return np.clip(image, 0, 255).astype(np.float32)
