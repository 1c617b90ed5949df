"""Draw a shipped model's learning curve over its training stages from its spec: val (and, where
the model has one, test) mIoU by epoch counted over the stages, the parts tried and not shipped,
and the target. OpenCV only, as `bigseg train` draws its curves.

    python tools/plot_curve.py                              # curve.json -> curves.png (CamVid)
    python tools/plot_curve.py landcover-dubai-curve.json   # -> landcover-dubai-curve.png

A spec holds `stages` and `after` (each part a `name`, the epoch it `start`s from and its `points`,
[epoch, val, test] with null for a split not scored), `target_val` and/or `target_test`, the
`png` it is drawn to, and optionally `labels` for the legend and `range` [low, high] of the mIoU axis.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import cv2
import numpy as np

HERE = Path(__file__).resolve().parents[1] / "weights"  # the shipped weights, their manifest and figures
W, H, PAD = 960, 420, 60
VAL, TEST, AFTER, GREY = (40, 140, 40), (30, 60, 200), (150, 150, 150), (200, 200, 200)
LABELS = {"val": "val mIoU", "test": "test mIoU", "after": "parts tried after the shipped file (not shipped)"}


def main(spec_name: str = "curve.json") -> Path:
    spec = json.loads((HERE / spec_name).read_text())
    lo, hi = spec.get("range", [30.0, 70.0])
    labels = {**LABELS, **spec.get("labels", {})}
    last = max(s["start"] + p[0] for group in ("stages", "after") for s in spec[group] for p in s["points"])
    x = lambda epoch: int(PAD + epoch / last * (W - 2 * PAD))
    y = lambda miou: int(H - PAD - (miou - lo) / (hi - lo) * (H - 1.5 * PAD))
    img = np.full((H, W, 3), 255, np.uint8)
    text = lambda s, at, colour=(0, 0, 0): cv2.putText(img, s, at, cv2.FONT_HERSHEY_SIMPLEX, 0.42, colour, 1, cv2.LINE_AA)
    for m in range(int(lo), int(hi) + 1, 5):
        cv2.line(img, (PAD, y(m)), (W - PAD, y(m)), GREY, 1)
        text(f"{m}", (PAD - 28, y(m) + 4))
    for split, colour in (("val", VAL), ("test", TEST)):
        if (target := spec.get(f"target_{split}")) is not None:
            cv2.line(img, (PAD, y(target)), (W - PAD, y(target)), colour, 1, cv2.LINE_4)
            text(f"{split} target {target:g}", (PAD + 6, y(target) - 6), colour)
    for stage in spec["stages"]:
        cv2.line(img, (x(stage["start"]), PAD // 2), (x(stage["start"]), H - PAD), GREY, 1)
        text(f"stage {stage['name']}", (x(stage["start"]) + 4, PAD // 2 + 12))
    for group, dim in (("stages", False), ("after", True)):
        for part in spec[group]:
            for column, colour in ((1, VAL), (2, TEST)):
                pts = [(x(part["start"] + p[0]), y(p[column])) for p in part["points"] if p[column] is not None]
                colour = AFTER if dim else colour
                for a, b in zip(pts, pts[1:]):
                    cv2.line(img, a, b, colour, 1 if dim else 2, cv2.LINE_AA)
                for p in pts:
                    cv2.circle(img, p, 3, colour, 1 if dim else -1, cv2.LINE_AA)
            if dim and part["start"] < spec["stages"][-1]["start"]:  # a run across the stages: named
                epoch, miou = next((p[0], p[1] if p[1] is not None else p[2]) for p in part["points"])
                text(part["name"], (x(part["start"] + epoch) + 6, y(miou) + 4), AFTER)
    cv2.rectangle(img, (PAD, PAD // 2), (W - PAD, H - PAD), (0, 0, 0), 1)
    text("epoch (over the stages)", (W // 2 - 80, H - PAD + 22))
    has_test = any(p[2] is not None for s in spec["stages"] for p in s["points"])
    legend = [(labels["val"], VAL)] + ([(labels["test"], TEST)] if has_test else []) + [(labels["after"], AFTER)]
    at = PAD
    for words, colour in legend:
        text(words, (at, H - 12), colour)
        at += 10 + cv2.getTextSize(words, cv2.FONT_HERSHEY_SIMPLEX, 0.42, 1)[0][0]
    out = HERE / spec["png"]
    cv2.imwrite(str(out), img)
    return out


if __name__ == "__main__":
    print(main(*sys.argv[1:2]))
