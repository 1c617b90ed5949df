"""Effective receptive field (radius holding 50/95/99% of |d logits(centre) / d input|) of each
registered architecture at two input sizes: a radius that stays put as the input grows is a
bounded context (the margin that makes tiled equal whole-image, up to that mass); one that
grows with the input means the model sees the whole tile (global pooling or a huge field).
This is where each architecture's `context_margin` comes from.

    python benchmarks/receptive_field.py [--sizes 512,1024] [--names dupsampling-rn50,...] [--model PATH]
"""
from __future__ import annotations

import argparse
import time

import torch

from bigseg.models import create_model, list_archs
from bigseg.models.receptive import effective_margin


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", default="512,1024")
    parser.add_argument("--names", default=",".join(s.name for s in list_archs()))
    parser.add_argument("--model", default=None, help="also a trained checkpoint (shipped name or path)")
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    models = []
    for name in args.names.split(","):
        torch.manual_seed(0)
        models.append((f"{name} (init)", create_model(name, 11)))
    if args.model:
        from bigseg.checkpoint import resolve_model
        models.append((f"{args.model} (trained)", resolve_model(args.model).build_model()))
    print(f"{'model':<34} {'input':>6}  {'r50':>5} {'r95':>5} {'r99':>5}  {'seconds':>7}  declared margin")
    for label, model in models:
        for size in sizes:
            t0 = time.perf_counter()
            radii = [effective_margin(model, size, q) for q in (0.5, 0.95, 0.99)]
            print(f"{label:<34} {size:>6}  {radii[0]:>5} {radii[1]:>5} {radii[2]:>5}  "
                  f"{time.perf_counter() - t0:7.1f}  {getattr(model, 'context_margin', None)}", flush=True)


if __name__ == "__main__":
    main()
