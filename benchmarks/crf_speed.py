"""Dense CRF time per megapixel on this machine, both back-ends, DeepLab defaults, 10 iterations,
11 classes; the plain softmax of the same probabilities is the baseline.

    python benchmarks/crf_speed.py [--size 480x360] [--device cpu]
"""
from __future__ import annotations

import argparse
import time

import torch

from bigseg.crf.meanfield import dense_crf
from bigseg.crf.params import CRFParams


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--size", default="480x360")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--classes", type=int, default=11)
    args = parser.parse_args()
    w, h = (int(v) for v in args.size.split("x"))
    torch.manual_seed(0)
    image = torch.rand(3, h, w, device=args.device) * 255
    probs = torch.randn(args.classes, h, w, device=args.device).softmax(0)
    t0 = time.perf_counter()
    probs.log().softmax(0)
    base = time.perf_counter() - t0
    print(f"{w}x{h}, {args.classes} classes, {args.device}; softmax alone {base * 1e3:.1f} ms")
    for name, p in (("lattice", CRFParams()), ("window r5", CRFParams(backend="window")),
                    ("window r5 /4", CRFParams(backend="window", downsample=4))):
        t0 = time.perf_counter()
        dense_crf(probs, image, p)
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        print(f"{name:<13} {dt:6.2f} s  {dt / (w * h / 1e6):6.2f} s/MP  ({dt / base:.0f}x softmax)")


if __name__ == "__main__":
    main()
