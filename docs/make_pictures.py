"""Draw the documentation's pictures (`docs/images/`) with bigseg itself:

- `street.jpg`: the shipped example street (`examples/street.jpg`, rendered by bigseg) beside the
  overlay of `bigseg predict --overlay` with the default model;
- `aerial.jpg`: a crop of a Dubai satellite mosaic (CC0; `../shared/data/aerial/dubai`, a tile the
  land-cover model never trained on) beside its prediction's overlay (with its legend of classes);
- `polygons.jpg`: the same crop with the polygons of `predict --vector` drawn over it.

    python docs/make_pictures.py [--aerial-model landcover-dubai] [--data ../shared/data]

Each picture is a JPEG under 300 KB. The CamVid-trained model's outputs are shipped as pictures of
the synthetic example only; the Dubai imagery is CC0, so pictures derived from it may be shipped.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

import cv2
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "docs" / "images"
MAX_BYTES = 300_000


def bigseg(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "bigseg", *map(str, args)], check=True)


def save(image: np.ndarray, path: Path) -> None:
    """A JPEG under MAX_BYTES (quality lowered until it fits)."""
    for quality in (88, 80, 72, 64, 56):
        ok, data = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, quality])
        if len(data) <= MAX_BYTES:
            break
    path.write_bytes(data.tobytes())
    print(f"{path.relative_to(ROOT)}: {image.shape[1]}x{image.shape[0]}, {len(data) / 1e3:.0f} kB")


def side_by_side(left: np.ndarray, right: np.ndarray, gap: int = 8) -> np.ndarray:
    h = max(left.shape[0], right.shape[0])
    pad = lambda a: np.pad(a, ((0, h - a.shape[0]), (0, 0), (0, 0)), constant_values=255)
    return np.hstack([pad(left), np.full((h, gap, 3), 255, np.uint8), pad(right)])


def street(work: Path) -> None:
    bigseg("predict", ROOT / "examples" / "street.jpg", "-o", work, "--overlay", "-q")
    image = cv2.imread(str(ROOT / "examples" / "street.jpg"))
    overlay = cv2.imread(str(work / "street.overlay.png"))
    save(side_by_side(image, overlay), OUT / "street.jpg")


def aerial(work: Path, data: Path, model: str, crop: tuple[int, int, int]) -> None:
    import json

    import rasterio
    from rasterio.windows import Window

    x, y, side = crop
    src = data / "aerial" / "dubai" / "images" / "tile5.tif"
    with rasterio.open(src) as ds:
        profile = ds.profile
        pixels = ds.read(window=Window(x, y, side, side))
    profile.update(width=side, height=side, photometric="RGB")
    part = work / "dubai.tif"
    with rasterio.open(part, "w", **profile) as out:
        out.write(pixels)
    bigseg("predict", part, "-m", model, "-o", work, "--overlay", "--vector", "gpkg", "--min-area", "20", "-q")
    image = np.ascontiguousarray(pixels.transpose(1, 2, 0)[..., ::-1])
    overlay = cv2.imread(str(work / "dubai.overlay.png"))
    overlay = cv2.resize(overlay, (image.shape[1], image.shape[0]), interpolation=cv2.INTER_AREA)
    with rasterio.open(work / "dubai.mask.tif") as ds:
        classes = json.loads(ds.tags()["classes"])
        palette = [list(ds.colormap(1)[i][:3]) for i in range(len(classes))]
    scale = 640 / side
    pair = side_by_side(cv2.resize(image, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA),
                        cv2.resize(overlay, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA))
    save(pair, OUT / "aerial.jpg")  # the overlay carries its own legend
    drawn = cv2.resize(image, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA)
    polygons(drawn, work / "dubai.polygons.gpkg", palette, scale)
    save(drawn, OUT / "polygons.jpg")


def polygons(canvas: np.ndarray, path: Path, palette: list[list[int]], scale: float) -> None:
    """Each polygon's outline (and holes) in its class colour over the image (pixel coordinates)."""
    import pyogrio
    import shapely

    _, _, wkb, fields = pyogrio.raw.read(path)
    for geometry, value in zip(shapely.from_wkb(wkb), fields[0]):
        colour = tuple(int(c) for c in palette[int(value)][::-1])
        for polygon in getattr(geometry, "geoms", [geometry]):
            for ring in [polygon.exterior, *polygon.interiors]:
                points = np.round(np.asarray(ring.coords) * scale).astype(np.int32)
                cv2.polylines(canvas, [points], True, colour, 1, cv2.LINE_AA)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--aerial-model", default="landcover-dubai")
    p.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data")
    p.add_argument("--crop", default="600,900,1200", help="x,y,side of the crop of tile5")
    args = p.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        street(Path(tmp))
        if (args.data / "aerial" / "dubai").is_dir():
            aerial(Path(tmp), args.data, args.aerial_model, tuple(int(v) for v in args.crop.split(",")))


if __name__ == "__main__":
    main()
