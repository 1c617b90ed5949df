"""Draw `curves.png`, the learning curve of the shipped CamVid model's long run, from `curve.json`
(the figures recorded in README.md): val and test mIoU by epoch over all stages, the parts tried
after the shipped file, and the test target. OpenCV only, as `bigseg train` draws its curves.

    python weights/plot_curve.py
"""
from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np

HERE = Path(__file__).resolve().parent
W, H, PAD, LO, HI = 960, 420, 60, 30.0, 70.0
VAL, TEST, AFTER, GREY = (40, 140, 40), (30, 60, 200), (150, 150, 150), (200, 200, 200)


def main() -> None:
    spec = json.loads((HERE / "curve.json").read_text())
    last = max(s["start"] + p[0] for group in ("stages", "after") for s in spec[group] for p in s["points"])
    x = lambda epoch: int(PAD + epoch / last * (W - 2 * PAD))
    y = lambda miou: int(H - PAD - (miou - LO) / (HI - LO) * (H - 1.5 * PAD))
    img = np.full((H, W, 3), 255, np.uint8)
    text = lambda s, at, colour=(0, 0, 0): cv2.putText(img, s, at, cv2.FONT_HERSHEY_SIMPLEX, 0.42, colour, 1, cv2.LINE_AA)
    for m in range(int(LO), int(HI) + 1, 5):
        cv2.line(img, (PAD, y(m)), (W - PAD, y(m)), GREY, 1)
        text(f"{m}", (PAD - 28, y(m) + 4))
    target = spec["target_test"]
    cv2.line(img, (PAD, y(target)), (W - PAD, y(target)), TEST, 1, cv2.LINE_4)
    text(f"test target {target:g}", (PAD + 6, y(target) - 6), TEST)
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
    text("val mIoU", (PAD, H - 12), VAL)
    text("test mIoU (62 frames)", (PAD + 90, H - 12), TEST)
    text("parts tried after the shipped file (not shipped): val above, test below", (PAD + 280, H - 12), AFTER)
    cv2.imwrite(str(HERE / "curves.png"), img)


if __name__ == "__main__":
    main()
