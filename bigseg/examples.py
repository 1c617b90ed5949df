"""The example street scene: a synthetic street rendered from scratch (an image the project may
ship and test with), shipped as `examples/street.jpg` in the repository and in the wheel.

`python -m bigseg.examples [FOLDER]` writes `FOLDER/street.jpg` (default `examples/`), so the
README's first command works from a wheel install too.

Sky at the top, building facades, a road in perspective with lane marks, a pavement, trees and
cars; `render_street` returns the RGB image and its CamVid-class label map (sky 0, building 1,
road 3, sidewalk 4, tree 5, car 8).
"""
from __future__ import annotations

import sys
from importlib import resources
from pathlib import Path

import numpy as np

EXAMPLE = "street.jpg"


def write_example(folder: str | Path = "examples") -> tuple[Path, bool]:
    """Copy the shipped example image into `folder`; (its path, whether it was written now)."""
    from bigseg.atomic import atomic_path

    target = Path(folder) / EXAMPLE
    if target.is_file():
        return target, False
    data = resources.files("bigseg.example_images").joinpath(EXAMPLE).read_bytes()
    target.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(target) as tmp:
        tmp.write_bytes(data)
    return target, True


def render_street(width: int = 480, height: int = 360, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(height, width, 3) uint8 RGB image and (height, width) uint8 labels."""
    import cv2

    rng = np.random.default_rng(seed)
    img = np.zeros((height, width, 3), np.float32)
    lab = np.zeros((height, width), np.uint8)
    horizon = int(height * 0.45)
    # sky: an overcast gradient, pale blue-grey to near white (as in most street-scene data)
    t = np.linspace(0, 1, horizon)[:, None]
    img[:horizon] = (np.array([165, 180, 200]) * (1 - t) + np.array([228, 230, 234]) * t)[:, None, :]
    # buildings: a row of facades of varied height and colour, with windows
    x = 0
    while x < width:
        w = int(rng.integers(width // 8, width // 4))
        top = int(rng.integers(int(height * 0.08), int(horizon * 0.8)))
        colour = rng.integers(90, 180, 3).astype(np.float32) * np.array([1.0, 0.9, 0.8])
        img[top:horizon + 20, x:x + w] = colour
        lab[top:horizon + 20, x:x + w] = 1
        for wy in range(top + 8, horizon, 22):
            for wx in range(x + 6, x + w - 10, 18):
                img[wy:wy + 10, wx:wx + 8] = colour * 0.45
        x += w
    # road in perspective, pavements on both sides
    road = np.array([[width * 0.42, horizon + 20], [width * 0.58, horizon + 20], [width * 1.1, height],
                     [-width * 0.1, height]], np.int32)
    cv2.fillPoly(lab, [road], 3)
    walk_l = np.array([[0, horizon + 20], [width * 0.42, horizon + 20], [-width * 0.1, height], [0, height]], np.int32)
    walk_r = np.array([[width * 0.58, horizon + 20], [width, horizon + 20], [width, height], [width * 1.1, height]], np.int32)
    cv2.fillPoly(lab, [walk_l, walk_r], 4)
    img[lab == 3] = (105, 100, 110)
    img[lab == 4] = (170, 160, 150)
    for k in range(6):  # dashed centre line
        y0 = horizon + 20 + (height - horizon - 20) * k / 6
        y1 = y0 + (height - horizon - 20) / 12
        cv2.line(img, (width // 2, int(y0)), (width // 2, int(y1)), (230, 230, 220), max(1, int(2 + k)))
    # trees on the pavement
    for cx in (int(width * 0.08), int(width * 0.92)):
        cy, r = horizon + 5, int(height * 0.12)
        cv2.circle(lab, (cx, cy), r, 5, -1)
        cv2.circle(img, (cx, cy), r, (60, 110, 50), -1)
    # cars on the road
    for cx, scale in ((0.35, 0.9), (0.62, 0.6)):
        w, h = int(width * 0.16 * scale), int(height * 0.12 * scale)
        x0, y0 = int(width * cx), int(horizon + 40 + (1 - scale) * 20)
        colour = tuple(int(c) for c in rng.integers(40, 220, 3))
        cv2.rectangle(img, (x0, y0), (x0 + w, y0 + h), colour, -1)
        cv2.rectangle(lab, (x0, y0), (x0 + w, y0 + h), 8, -1)
        cv2.rectangle(img, (x0 + w // 6, y0 + 2), (x0 + 5 * w // 6, y0 + h // 3), (40, 50, 60), -1)
    img += rng.normal(0, 6, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8), lab


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) > 1 or any(a.startswith("-") for a in args):
        print("usage: python -m bigseg.examples [FOLDER]   (writes FOLDER/street.jpg; default examples/)",
              file=sys.stderr)
        return 2
    path, written = write_example(args[0] if args else "examples")
    print(f"{'wrote' if written else 'already there:'} {path}; try: bigseg predict {path} --overlay")
    return 0


if __name__ == "__main__":
    sys.exit(main())
