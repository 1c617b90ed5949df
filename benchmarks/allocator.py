"""`bigseg predict` with and without glibc keeping freed memory (`BIGSEG_KEEP_FREED_MEMORY=1`,
bigseg.runtime.keep_freed_memory), interleaved rounds in fresh processes: wall, user and kernel
seconds and peak RSS of each.

    python benchmarks/allocator.py /tmp/ortho3000.tif --engine torch --rounds 2

Without the setting every large activation is a fresh mapping whose pages the kernel faults in
again each batch (the kernel time); with it the heap keeps them, at the cost of a higher peak.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def run(src: Path, dst: Path, args, keep: bool) -> tuple[float, float, float, float]:
    """Wall, user and system seconds and peak RSS (MiB) of one `bigseg predict` in a fresh process."""
    env = {**os.environ, "BIGSEG_KEEP_FREED_MEMORY": "1" if keep else "0"}
    cmd = [sys.executable, "-W", "ignore", "-m", "bigseg", "predict", str(src), "-o", str(dst),
           "--overwrite", "-q", "--device", "cpu", "--model", args.model, "--engine", args.engine,
           "--tile", str(args.tile), "--batch-size", str(args.batch)]
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env)  # started from this small process, so its peak RSS is its own
    _, status, usage = os.wait4(proc.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        sys.exit(f"command failed: {' '.join(cmd)}")
    return time.perf_counter() - start, usage.ru_utime, usage.ru_stime, usage.ru_maxrss / 1024


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("input", type=Path)
    p.add_argument("--model", default="ladder-dn121-camvid")
    p.add_argument("--engine", default="torch")
    p.add_argument("--tile", type=int, default=1024)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--rounds", type=int, default=2)
    args = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bigseg-alloc-"))
    walls: dict[bool, list[float]] = {False: [], True: []}
    for round_ in range(1, args.rounds + 1):
        for keep in (False, True):
            wall, user, system, rss = run(args.input, work / f"out_{keep}.tif", args, keep)
            walls[keep].append(wall)
            print(f"round {round_}, keep freed memory {'on ' if keep else 'off'}: wall {wall:.1f} s, user {user:.1f} s, "
                  f"kernel {system:.1f} s, peak RSS {rss:.0f} MiB", flush=True)
    print(f"mean wall without / with: {sum(walls[False]) / sum(walls[True]):.2f}x")


if __name__ == "__main__":
    main()
