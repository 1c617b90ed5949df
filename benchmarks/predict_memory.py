"""Peak resident memory of `bigseg predict` on a 20000x20000 versus a 5000x5000 georeferenced RGB
GeoTIFF with identical settings (CPU, a small ladder config): memory must not grow with the image,
and it must lie within 25% of the `predict --dry-run` estimate.

    python benchmarks/predict_memory.py [--work DIR] [--sizes 5000,20000]

Each prediction runs in its own process; its peak RSS comes from the kernel (wait4 rusage).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

SMALL = dict(densenet=dict(growth_rate=8, block_config=[2, 2, 2, 2], num_init_features=16, bn_size=2),
             spp_bottleneck=32, spp_level=8, spp_width=32, up_widths=[32, 32, 16, 16], squeeze=16)
TILE, OVERLAP, BATCH, CLASSES = 1024, 128, 4, 11


def make_raster(path: Path, side: int) -> None:
    """Tiled, deflate-compressed RGB GeoTIFF with smooth content, written strip by strip."""
    import rasterio
    from rasterio.transform import from_origin

    profile = dict(driver="GTiff", width=side, height=side, count=3, dtype="uint8", crs="EPSG:3857",
                   transform=from_origin(0, 0, 0.1, 0.1), tiled=True, blockxsize=512, blockysize=512,
                   compress="deflate", BIGTIFF="IF_SAFER")
    x = np.arange(side, dtype=np.float32)
    with rasterio.open(path, "w", **profile) as dst:
        for r in range(0, side, 1024):
            rows = np.arange(r, min(side, r + 1024), dtype=np.float32)[:, None]
            band = (127 + 100 * np.sin(x / 97.0) * np.cos(rows / 131.0)).astype(np.uint8)
            dst.write(np.stack([band, band[:, ::-1], band.T[: len(rows), : side] if side == len(rows) else band]),
                      window=rasterio.windows.Window(0, r, side, len(rows)))


# Linux keeps a process's peak RSS across exec, and a child starts with its parent's: a command
# started by a large process (this benchmark after holding whole images) would report that
# process's peak. A small launcher process starts the command instead and reports its figure.
LAUNCHER = """import os, subprocess, sys
proc = subprocess.Popen(sys.argv[2:])
_, status, usage = os.wait4(proc.pid, 0)
open(sys.argv[1], "w").write(str(usage.ru_maxrss))
sys.exit(os.waitstatus_to_exitcode(status))"""


def peak_rss_mb(cmd: list[str], env: dict | None = None, cwd: Path | None = None) -> tuple[float, float, dict]:
    """Peak RSS (MiB) and seconds of `cmd` (run in `cwd`), and its JSON summary on stdout."""
    start = time.perf_counter()
    with tempfile.TemporaryFile() as stdout, tempfile.TemporaryDirectory() as scratch:
        figure = Path(scratch) / "maxrss"
        proc = subprocess.Popen([sys.executable, "-c", LAUNCHER, str(figure), *cmd], stdout=stdout,
                                stderr=subprocess.PIPE, env=env, cwd=cwd)
        err = proc.stderr.read().decode()
        if proc.wait() != 0:
            sys.exit(f"command failed: {' '.join(cmd)}\n{err}")
        stdout.seek(0)
        summary = json.loads(stdout.read() or b"{}")
        kib = int(figure.read_text())
    return kib / 1024, time.perf_counter() - start, summary


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--work", type=Path, default=None)
    parser.add_argument("--sizes", default="5000,20000")
    parser.add_argument("--model", default=None, help="a shipped model or checkpoint instead of the small config")
    parser.add_argument("--device", default="cpu", help="cpu or cuda: on a GPU the peak GPU memory is compared too")
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="bigseg-mem-"))
    work.mkdir(parents=True, exist_ok=True)

    import torch

    from bigseg.checkpoint import from_model, save_checkpoint
    from bigseg.models import create_model

    torch.manual_seed(0)
    model = args.model or save_checkpoint(from_model(create_model("ladder-dn121", CLASSES, **SMALL), "ladder-dn121",
                                                     [f"c{i}" for i in range(CLASSES)]), work / "small.pt")
    rows = []
    for side in (int(s) for s in args.sizes.split(",")):
        src = work / f"synthetic_{side}.tif"
        if not src.exists():
            make_raster(src, side)
        out = work / f"out_{side}"
        cmd = [sys.executable, "-m", "bigseg", "predict", str(src), "-m", str(model), "-o", str(out),
               "--overwrite", "--device", args.device, "--tile", str(TILE), "--overlap", str(OVERLAP),
               "--batch-size", str(BATCH), "--json"]
        rss, seconds, summary = peak_rss_mb(cmd)
        rows.append((side, rss, seconds))
        plan = json.loads(subprocess.run(cmd + ["--dry-run"], capture_output=True, text=True,
                                         check=True).stdout)[0]
        est = plan["memory_mib"]["host"]
        print(f"{side}x{side}: {side * side / 1e6:.0f} MP, peak RSS {rss:.0f} MiB, {seconds:.1f} s, "
              f"{side * side / 1e6 / seconds:.2f} MP/s; --dry-run estimate {est:.0f} MiB, "
              f"measured/estimate {rss / est:.2f} (limit 0.75..1.25)", flush=True)
        gpu = summary["done"][0].get("gpu_peak_mib")
        if gpu is not None:
            est = plan["memory_mib"]["gpu"]
            print(f"    GPU peak {gpu:.0f} MiB; --dry-run estimate {est:.0f} MiB, measured/estimate "
                  f"{gpu / est:.2f} (limit 0.75..1.25)", flush=True)
    from bigseg.tiling.geometry import TileGrid

    (s0, r0, _), (s1, r1, _) = rows[0], rows[-1]
    print(f"\npeak RSS ratio {s1}^2 / {s0}^2 = {r1 / r0:.3f} (limit 1.25) for {(s1 / s0) ** 2:.0f}x the pixels")
    for side in (s0, s1):
        grid = TileGrid(side, side, TILE, OVERLAP)
        stitch = (CLASSES + 1) * 4 * (grid.max_overlap * side + 4 * TILE * TILE) / 2**20
        print(f"stitcher bound (C+1)*4*(O'*W + 4*T^2) at width {side} (O' = {grid.max_overlap}): {stitch:.0f} MiB")


if __name__ == "__main__":
    main()
