"""Polygonisation time and peak memory of `bigseg vectorize` (streaming, `bigseg.vector.polygons`) on class
masks of the same content density at two sizes, on a worst case (one region spanning the whole
mask, full of holes), and on real masks; each in a fresh process, in one run.

    python benchmarks/vectorize_memory.py [--sizes 5000,20000] [--real ../shared/data/aerial/dubai/labels/tile7.tif ...]

The synthetic masks repeat one 1000x1000 pattern of blobs, bars and rings (about 60 regions per
megapixel; the bars cross the tiles' edges, so regions span blocks), written as a tiled GeoTIFF
without ever holding the whole mask. The worst case is one class everywhere with a grid of small
holes of another: its single region stays open until the last row, so memory grows with its
outline (holes included), which `StreamingPolygons(max_open_vertices=...)` bounds with an error.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

# VmHWM, not ru_maxrss: Linux keeps ru_maxrss across fork and exec, so a child of this (larger)
# process would report this process's peak.
RUN = """
import json, resource, sys, time
from pathlib import Path
from bigseg.run.vectorize import VectorOptions, vectorize_file
t = time.perf_counter()
r = vectorize_file(Path(sys.argv[1]), Path(sys.argv[2]), VectorOptions(), Path(sys.argv[2]).with_suffix('.csv'))
u = resource.getrusage(resource.RUSAGE_SELF)
print(json.dumps({"polygons": r.polygons, "seconds": time.perf_counter() - t, "cpu_s": u.ru_utime + u.ru_stime,
                  "peak_mib": int(next(l for l in open('/proc/self/status') if l.startswith('VmHWM')).split()[1]) / 1024}))
"""


def pattern(side: int = 1000) -> np.ndarray:
    import cv2

    rng = np.random.default_rng(0)
    m = np.zeros((side, side), np.uint8)
    for _ in range(40):
        cv2.circle(m, (int(rng.integers(0, side)), int(rng.integers(0, side))), int(rng.integers(5, 40)),
                   int(rng.integers(1, 4)), -1)
    m[:, 480:520] = 2   # bars that run off every tile: regions spanning the whole mask's height/width
    m[480:500, :] = 3
    for k in range(10):  # rings with holes
        cv2.circle(m, (100 + 80 * k, 900), 30, 1, 6)
    return m


def write_mask(path: Path, side: int, worst: bool = False) -> Path:
    import rasterio
    from rasterio.transform import from_origin
    from rasterio.windows import Window

    if path.exists():
        return path
    tile = pattern()
    if worst:  # one region of class 1 everywhere, holes of class 2 every 50 px
        tile = np.ones((1000, 1000), np.uint8)
        tile[20:30, :] = 1
        for y in range(10, 1000, 50):
            for x in range(10, 1000, 50):
                tile[y:y + 8, x:x + 8] = 2
    profile = dict(driver="GTiff", width=side, height=side, count=1, dtype="uint8", nodata=255, crs="EPSG:32633",
                   transform=from_origin(500000, 4000000, 0.5, 0.5), tiled=True, blockxsize=512, blockysize=512,
                   compress="deflate")
    with rasterio.open(path, "w", **profile) as ds:
        for top in range(0, side, 1000):
            h = min(1000, side - top)
            row = np.tile(tile, (1, -(-side // 1000)))[:h, :side]
            ds.write(row, 1, window=Window(0, top, side, h))
    return path


def measure(mask: Path, work: Path) -> dict:
    done = subprocess.run([sys.executable, "-c", RUN, str(mask), str(work / f"{mask.stem}.polygons.gpkg")],
                          capture_output=True, text=True)
    if done.returncode:
        return {"error": done.stderr.strip().splitlines()[-1]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="5000,20000")
    p.add_argument("--worst", type=int, default=10000, help="side of the worst-case mask (0: skip)")
    p.add_argument("--real", nargs="*", default=[])
    p.add_argument("--work", type=Path, default=None)
    args = p.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="bigseg-vec-"))
    work.mkdir(parents=True, exist_ok=True)
    rows = []
    for side in [int(s) for s in args.sizes.split(",") if s]:
        rows.append((f"synthetic {side}^2", side * side, measure(write_mask(work / f"mask_{side}.tif", side), work)))
    if args.worst:
        rows.append((f"worst case {args.worst}^2 (one region)", args.worst ** 2,
                     measure(write_mask(work / f"worst_{args.worst}.tif", args.worst, worst=True), work)))
    for real in args.real:
        import rasterio

        with rasterio.open(real) as ds:
            pixels = ds.width * ds.height
        rows.append((Path(real).name, pixels, measure(Path(real), work)))
    print("| mask | megapixels | polygons | seconds | CPU s per MP | peak RSS MiB |")
    print("|---|---|---|---|---|---|")
    for name, pixels, r in rows:
        if "error" in r:
            print(f"| {name} | {pixels / 1e6:.0f} | error: {r['error']} | | | |")
            continue
        print(f"| {name} | {pixels / 1e6:.1f} | {r['polygons']} | {r['seconds']:.1f} | "
              f"{r['cpu_s'] / (pixels / 1e6):.3f} | {r['peak_mib']:.0f} |")
    synthetic = [(px, r) for name, px, r in rows if name.startswith("synthetic") and "error" not in r]
    if len(synthetic) >= 2:
        (a, ra), (b, rb) = synthetic[0], synthetic[-1]
        print(f"peak memory {rb['peak_mib'] / ra['peak_mib']:.2f}x for {b / a:.0f}x the pixels")


if __name__ == "__main__":
    main()
