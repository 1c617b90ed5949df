"""Are two trees of `bigseg predict` outputs the same? For every GeoTIFF: pixels of every band,
internal masks, tags, CRS, transform, ground control points, colour table, overviews and
profile; for every PNG the decoded pixels. Used to show that a refactoring changes no output.

    python benchmarks/same_outputs.py BEFORE_DIR AFTER_DIR
"""
from __future__ import annotations

import sys
from pathlib import Path

import cv2
import numpy as np
import rasterio


def gcps(ds) -> tuple:
    points, crs = ds.gcps
    return tuple((p.row, p.col, p.x, p.y, p.z, p.id) for p in points), crs


def same_tif(a: Path, b: Path) -> bool:
    with rasterio.open(a) as x, rasterio.open(b) as y:
        return (np.array_equal(x.read(), y.read()) and np.array_equal(x.read_masks(), y.read_masks())
                and x.tags() == y.tags() and x.crs == y.crs and x.transform == y.transform and gcps(x) == gcps(y)
                and x.overviews(1) == y.overviews(1) and x.profile == y.profile
                and (x.colormap(1) == y.colormap(1) if x.count == 1 and x.colorinterp[0].name == "palette" else True))


def main() -> None:
    a, b = Path(sys.argv[1]), Path(sys.argv[2])
    files = lambda root: sorted(p.relative_to(root) for p in root.rglob("*") if p.suffix in (".tif", ".png"))
    fa, fb = files(a), files(b)
    differ = 0
    if fa != fb:
        print("only in one tree:", sorted(set(fa) ^ set(fb)))
        differ += 1
    for rel in (r for r in fa if r in set(fb)):
        if rel.suffix == ".png":
            x, y = (cv2.imread(str(root / rel), cv2.IMREAD_UNCHANGED) for root in (a, b))
            same = x.shape == y.shape and np.array_equal(x, y)
        else:
            same = same_tif(a / rel, b / rel)
        print(("same    " if same else "DIFFERS ") + str(rel))
        differ += not same
    print(f"{len(fa)} files compared, {differ} differ")
    sys.exit(1 if differ else 0)


if __name__ == "__main__":
    main()
