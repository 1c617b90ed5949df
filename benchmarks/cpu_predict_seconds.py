"""CPU seconds of a whole `bigseg predict` (reading, inference, stitching, writing) of one image:
another checkout's (the baseline) against this one's, each warm (its cache prepared by a first
run that is not counted), with the share of valid pixels whose labels agree and this CPU's kind.

    python benchmarks/cpu_predict_seconds.py --before /tmp/d35d572 \\
        --ortho ../shared/data/ortho/yb_z21_epsg3857_jpeg_mask.tif --crop 2048 --model ladder-dn121-camvid

`--also MODEL` times other models' whole predict in this checkout too (e.g. a SwiftNet against
`ladder-dn121`). The baseline runs with its own defaults (`--engine` as it chooses); this checkout runs `auto` and,
for reference, `--engine torch --precision fp32`, whose labels are the fp32 reference. Each
checkout gets a cache folder of its own. Figures: user + system CPU seconds of the command and its
children (all threads), and wall seconds.
"""
from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import rasterio

sys.path.insert(0, str(Path(__file__).parent))
from pipeline_throughput import crop  # noqa: E402

HERE = Path(__file__).resolve().parent.parent


def cpu_kind() -> str:
    flags = set()
    name = "unknown CPU"
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
    units = "AMX" if "amx_bf16" in flags else "AVX-512 BF16" if "avx512_bf16" in flags else "AVX2 only"
    return f"{name}, {os.cpu_count()} cores, {units}"


def run(checkout: Path, src: Path, dst: Path, model: str, cache: Path, extra: list[str]) -> tuple[float, float]:
    """CPU and wall seconds of one `bigseg predict` from `checkout`, in a fresh process."""
    env = {**os.environ, "PYTHONPATH": str(checkout), "BIGSEG_CACHE": str(cache)}
    for name in ("BIGSEG_ENGINE", "BIGSEG_PRECISION"):
        env.pop(name, None)
    cmd = [sys.executable, "-m", "bigseg", "predict", str(src), "-m", model, "-o", str(dst), "--overwrite", *extra]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    proc = subprocess.run(cmd, env=env, cwd=checkout, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        sys.exit(f"failed: {' '.join(cmd)}\n{proc.stderr}")
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime, wall


def labels(path: Path) -> np.ndarray:
    with rasterio.open(path) as ds:
        return ds.read(1)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--before", type=Path, required=True, help="the baseline checkout (e.g. a git worktree)")
    p.add_argument("--ortho", type=Path, required=True)
    p.add_argument("--crop", type=int, default=2048)
    p.add_argument("--model", default="ladder-dn121-camvid")
    p.add_argument("--work", type=Path, default=None)
    p.add_argument("--also", action="append", default=[], metavar="MODEL",
                   help="another model (name or .pt) whose whole predict this checkout runs too, auto, warm")
    args = p.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="bigseg-cpu-"))
    work.mkdir(parents=True, exist_ok=True)
    src = crop(args.ortho, args.crop, work / f"ortho_{args.crop}.tif")
    print(f"CPU: {cpu_kind()}; input {src} ({args.crop}x{args.crop})", flush=True)
    arms = {"baseline": (args.before, args.model, []), "auto": (HERE, args.model, ["--engine", "auto"]),
            "torch fp32": (HERE, args.model, ["--engine", "torch", "--precision", "fp32"]),
            **{f"auto {Path(m).stem}": (HERE, m, ["--engine", "auto"]) for m in args.also}}
    seconds = {}
    for name, (checkout, model, extra) in arms.items():
        cache = work / f"cache-{name.replace(' ', '-')}"
        dst = work / f"{name.replace(' ', '-')}.tif"
        run(checkout, src, dst, model, cache, extra)  # warm-up: exports, timings, cards
        cpu, wall = run(checkout, src, dst, model, cache, extra)
        seconds[name] = cpu
        print(f"{name:<11} {cpu:7.1f} CPU s ({cpu / (args.crop ** 2 / 1e6):.2f} CPU s/MP), {wall:6.1f} s wall", flush=True)
    reference = labels(work / "torch-fp32.tif")
    valid = reference != 255
    for name in ("baseline", "auto"):
        agree = float((labels(work / f"{name}.tif") == reference)[valid].mean())
        print(f"{name:<11} labels equal to torch fp32 on {agree:.4%} of valid pixels")
    print(f"auto / baseline: {seconds['baseline'] / seconds['auto']:.2f}x fewer CPU seconds")
    for name in arms:
        if name.startswith("auto "):
            print(f"{name} / auto {args.model}: {seconds[name] / seconds['auto']:.2f}x the CPU seconds")


if __name__ == "__main__":
    main()
