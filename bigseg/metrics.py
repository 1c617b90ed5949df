"""Confusion matrix and the scores computed from it (per-class IoU, mean IoU, pixel accuracy)."""
from __future__ import annotations

import numpy as np

IGNORE = 255


def confusion(pred: np.ndarray, label: np.ndarray, num_classes: int) -> np.ndarray:
    """(C, C) counts, rows = ground truth, columns = prediction; ignore-labelled pixels skipped."""
    keep = label != IGNORE
    index = label[keep].astype(np.int64) * num_classes + pred[keep].astype(np.int64)
    return np.bincount(index, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def scores(conf: np.ndarray, classes: list[str]) -> dict:
    """IoU = TP / (TP + FP + FN) per class; mIoU over classes present in labels or predictions."""
    tp = np.diag(conf).astype(np.float64)
    denom = conf.sum(0) + conf.sum(1) - tp
    iou = np.divide(tp, denom, out=np.full_like(tp, np.nan), where=denom > 0)
    return {
        "miou": float(np.nanmean(iou)) if np.isfinite(iou).any() else 0.0,
        "pixel_accuracy": float(tp.sum() / max(conf.sum(), 1)),
        "iou": {c: (None if np.isnan(v) else float(v)) for c, v in zip(classes, iou)},
        "pixels": int(conf.sum()),
    }
