"""Time and peak memory of `bigseg predict` with an area of interest of about 5% of a scene, against
the whole scene, in the same run (issue 51: they follow the area, not the scene).

    python benchmarks/aoi_cost.py [--raster ../shared/data/ortho/yb_z21_epsg3857_jpeg_mask.tif]
                                  [--model swiftnet-lite0-camvid] [--share 0.05] [--threads 2]

The area is a box centred on the scene, `share` of its pixels. Each prediction runs in its own
process (torch engine, fp32, one job each); peak RSS from the kernel, wall seconds around it.
Prints one JSON object with both runs and the ratios, and the CPU's kind.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from predict_memory import peak_rss_mb  # noqa: E402  (the same launcher: the child's own peak)

HERE = Path(__file__).resolve().parents[1]


def cpu_kind() -> str:
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    name = next((line.split(":", 1)[1].strip() for line in flags.splitlines() if line.startswith("model name")), "?")
    units = [f for f in ("amx_bf16", "avx512_bf16") if f in flags] or ["no bf16 units"]
    return f"{name}, {os.cpu_count()} cores, {', '.join(units)}"


def centred_box(raster: Path, share: float) -> str:
    import rasterio

    with rasterio.open(raster) as ds:
        side = math.sqrt(share)
        w, h = ds.width * side, ds.height * side
        c0, r0 = (ds.width - w) / 2, (ds.height - h) / 2
        (x0, y0), (x1, y1) = ds.transform * (c0, r0 + h), ds.transform * (c0 + w, r0)
        return f"{x0},{y0},{x1},{y1}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--raster", type=Path, default=HERE.parent / "shared/data/ortho/yb_z21_epsg3857_jpeg_mask.tif")
    parser.add_argument("--model", default="swiftnet-lite0-camvid")
    parser.add_argument("--share", type=float, default=0.05)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    env = {**os.environ, "BIGSEG_ENGINE": "torch", "BIGSEG_PRECISION": "fp32", "OMP_WAIT_POLICY": "PASSIVE",
           "PYTHONPATH": str(HERE)}
    runs = {}
    with tempfile.TemporaryDirectory() as work:
        for name, extra in (("whole", []), ("aoi", ["--bbox", centred_box(args.raster, args.share)])):
            cmd = [sys.executable, "-m", "bigseg", "predict", str(args.raster), "-m", args.model, "-o",
                   str(Path(work) / f"{name}.mask.tif"), "--device", "cpu", "--threads", str(args.threads),
                   "--json", *extra]
            mib, seconds, summary = peak_rss_mb(cmd, env=env)
            done = summary["done"][0]
            runs[name] = {"seconds": round(seconds, 1), "peak_mib": round(mib), "pixels": done["width"] * done["height"]}
    ratio = lambda key: round(runs["aoi"][key] / runs["whole"][key], 3)
    print(json.dumps({"cpu": cpu_kind(), "raster": str(args.raster), "model": args.model, "share": args.share,
                      "runs": runs, "aoi/whole": {k: ratio(k) for k in ("pixels", "seconds", "peak_mib")}}, indent=1))


if __name__ == "__main__":
    main()
