"""`bigseg eval`: score a model on a labelled split through the same tiled engine as predict."""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

import numpy as np

from bigseg.datasets import SegmentationDataset
from bigseg.errors import DatasetError
from bigseg.metrics import confusion, scores
from bigseg.predictor import Predictor
from bigseg.runtime import check_stop


@dataclass
class EvalResult:
    dataset: str
    split: str
    images: int
    seconds: float
    scores: dict
    confusion: np.ndarray

    def to_dict(self) -> dict:
        return {"dataset": self.dataset, "split": self.split, "images": self.images,
                "seconds": round(self.seconds, 2), **self.scores, "confusion": self.confusion.tolist()}


def evaluate(predictor: Predictor, dataset: SegmentationDataset, split: str = "val",
             on_image: Callable[[int, int], None] | None = None) -> EvalResult:
    classes = predictor.checkpoint.classes
    if len(classes) != len(dataset.classes):
        raise DatasetError(f"the model predicts {len(classes)} classes but the {dataset.name} data "
                           f"has {len(dataset.classes)}")
    start = time.perf_counter()
    conf = np.zeros((len(classes), len(classes)), np.int64)
    for i in range(len(dataset)):
        check_stop()
        image, label = dataset[i]
        pred = predictor.scores(np.moveaxis(image, -1, 0).astype(np.float32)).argmax(0)
        conf += confusion(pred, label, len(classes))
        if on_image is not None:
            on_image(i + 1, len(dataset))
    return EvalResult(dataset.name, split, len(dataset), time.perf_counter() - start,
                      scores(conf, list(dataset.classes)), conf)
