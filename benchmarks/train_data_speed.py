"""Is a training step on raster scenes dominated by the model or by reading? Measured in one run
on the same data: the time to read and augment one batch of random windows (as a data worker
does: window draw, windowed read of image and labels, resize, flip, jitter), one batch of whole
images of an image folder for comparison, and one training step of the model on such a batch.

    python benchmarks/train_data_speed.py [--data ../shared/data/aerial/dubai] [--folder ../shared/data/camvid]
        [--batch 8] [--crop 384] [--batches 20] [--model ladder-dn121]

Reading runs in this process, one core, as one data worker does; `bigseg train --workers N`
overlaps N of them with the step. The ratio step / read says how many workers keep the model busy.
"""
from __future__ import annotations

import argparse
import os
import platform
import time
from pathlib import Path

import numpy as np

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                return name + (" (AMX)" if "amx_bf16" in open("/proc/cpuinfo").read() else "")
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def read_batches(data: str, split: str, crop: int, batch: int, batches: int) -> tuple[float, int]:
    """Seconds per batch of the epoch view's samples (read + augment), and how many were read."""
    from bigseg.io.gdal import gdal_env
    from bigseg.train.data import EpochView, RandomWindows, WholeImages, open_split
    from bigseg.train.transforms import Augment

    part = open_split(data, split)
    if part.source.whole_images:
        sampler = WholeImages(part.regions)
    else:
        sampler = RandomWindows(part.source, part.regions, batch * batches)
    view = EpochView(part.source, sampler, sampler.epoch(0, 0)[: batch * batches], Augment(crop, 0.5, 1.5, True, 0.3,
                                                                                           0.2, 0.5), 0, 0)
    n = min(len(view), batch * batches)
    with gdal_env():
        view[0]  # opens the first file: not part of the steady state
        start = time.perf_counter()
        for i in range(n):
            view[i]
    return (time.perf_counter() - start) / n * batch, n


def step_seconds(model: str, crop: int, batch: int, classes: int, steps: int = 3) -> float:
    import torch

    from bigseg.models import create_model
    from bigseg.train.losses import model_loss

    torch.manual_seed(0)
    net = create_model(model, classes, 3).train().to(memory_format=torch.channels_last)
    opt = torch.optim.Adam(net.parameters(), 1e-4)
    x = torch.randn(batch, 3, crop, crop).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, classes, (batch, crop, crop))
    times = []
    for i in range(steps + 1):
        t = time.perf_counter()
        logits, aux = net(x, return_aux=True)
        loss, _ = model_loss(net, logits, aux, y, 0.5, 0.4)
        opt.zero_grad()
        loss.backward()
        opt.step()
        times.append(time.perf_counter() - t)
    return float(np.median(times[1:]))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default=str(SHARED / "aerial" / "dubai"))
    p.add_argument("--folder", default=str(SHARED / "camvid"))
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--crop", type=int, default=384)
    p.add_argument("--batches", type=int, default=20)
    p.add_argument("--model", default="ladder-dn121")
    args = p.parse_args()
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    print(f"CPU: {cpu_name()}, {os.cpu_count()} cores; batch {args.batch}, crop {args.crop}")
    scenes, n = read_batches(args.data, "train", args.crop, args.batch, args.batches)
    print(f"raster scenes ({Path(args.data).name}): {scenes:.3f} s to read and augment a batch ({n} windows)")
    folder = None
    if Path(args.folder).is_dir():
        folder, m = read_batches(args.folder, "train", args.crop, args.batch, args.batches)
        print(f"image folder ({Path(args.folder).name}): {folder:.3f} s a batch ({m} whole images)")
    step = step_seconds(args.model, args.crop, args.batch, 5)
    print(f"{args.model} training step (fp32, {os.cpu_count()} threads): {step:.2f} s")
    print(f"step / read: {step / scenes:.1f}x for raster scenes"
          + ("" if folder is None else f", {step / folder:.1f}x for the image folder")
          + " (above 1: one data worker keeps the model busy)")


if __name__ == "__main__":
    main()
