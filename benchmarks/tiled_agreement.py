"""How often tiled prediction agrees with whole-image prediction for a model with global context
(`ladder-dn121`: SPP pools over the whole input, so tiles see less context than the whole frame).

    python benchmarks/tiled_agreement.py --model ladder-dn121 [--frames DIR] [--tile 1024] [--overlap 256]

Runs every frame of ../shared/data/cityscapes-sample/frames (2048x1024) once whole (one tile
larger than the frame) and once tiled, and prints the share of pixels with the same class.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

FRAMES = Path(__file__).resolve().parents[2] / "shared" / "data" / "cityscapes-sample" / "frames"


def main() -> None:
    import cv2

    from bigseg.checkpoint import resolve_model
    from bigseg.infer.predictor import Predictor

    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="ladder-dn121")
    parser.add_argument("--frames", type=Path, default=FRAMES)
    parser.add_argument("--tile", type=int, default=1024)
    parser.add_argument("--overlap", type=int, default=256)
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()
    ckpt = resolve_model(args.model)
    tiled = Predictor(ckpt, args.device, tile=args.tile, overlap=args.overlap, batch_size=2)
    total_same = total = 0
    print(f"model {args.model}, tile {args.tile}, overlap {args.overlap}")
    for path in sorted(args.frames.glob("*.png")):
        image = np.moveaxis(cv2.imread(str(path))[..., ::-1], -1, 0).astype(np.float32)
        h, w = image.shape[1:]
        whole = Predictor(ckpt, args.device, tile=max(h, w), overlap=0, batch_size=1)
        t0 = time.perf_counter()
        a = whole.scores(image).argmax(0)
        t1 = time.perf_counter()
        b = tiled.scores(image).argmax(0)
        t2 = time.perf_counter()
        same = int((a == b).sum())
        total_same, total = total_same + same, total + a.size
        print(f"{path.name}: {w}x{h}, agreement {100 * same / a.size:.2f} % "
              f"(whole {t1 - t0:.1f} s, tiled {len(tiled.grid(w, h))} tiles {t2 - t1:.1f} s)")
    print(f"all frames: {100 * total_same / max(total, 1):.2f} % of pixels agree")


if __name__ == "__main__":
    main()
