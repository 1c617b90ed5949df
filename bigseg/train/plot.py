"""Training curves as a PNG drawn with OpenCV (no plotting library needed): loss and val mIoU."""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from bigseg.atomic import atomic_path


def plot_curves(history: list[dict], path: Path, width: int = 800, height: int = 360) -> None:
    img = np.full((height, width, 3), 255, np.uint8)
    pad = 50
    series = [("train_loss", (200, 80, 30)), ("val_miou", (40, 140, 40))]
    cv2.rectangle(img, (pad, pad // 2), (width - pad, height - pad), (0, 0, 0), 1)
    n = max(len(history), 2)
    for i, (key, colour) in enumerate(series):
        values = [(j, r[key]) for j, r in enumerate(history) if r.get(key) is not None]
        if not values:
            continue
        vs = np.array([v for _, v in values], np.float64)
        lo, hi = (0.0, 1.0) if key == "val_miou" else (0.0, float(vs.max()) or 1.0)
        pts = [(int(pad + j / (n - 1) * (width - 2 * pad)),
                int(height - pad - (v - lo) / (hi - lo + 1e-12) * (height - 1.5 * pad))) for j, v in values]
        for a, b in zip(pts, pts[1:]):
            cv2.line(img, a, b, colour, 2, cv2.LINE_AA)
        for p in pts:
            cv2.circle(img, p, 3, colour, -1)
        label = f"{key} (last {vs[-1]:.3f}; axis 0..{hi:.2f})"
        cv2.putText(img, label, (pad + 10 + i * 360, height - 15), cv2.FONT_HERSHEY_SIMPLEX, 0.45, colour, 1, cv2.LINE_AA)
    cv2.putText(img, f"epochs 1..{len(history)}", (width - pad - 120, pad // 2 - 5), cv2.FONT_HERSHEY_SIMPLEX,
                0.45, (0, 0, 0), 1, cv2.LINE_AA)
    with atomic_path(path) as tmp:
        cv2.imwrite(str(tmp), img)
