"""`bigseg eval` and validation during training: a model scored on a split through the same tiled
engine as predict. Each region (a whole image or scene, or a validation block) is streamed through
the predictor in tiles, in bounded memory; pixels where the image has no data are not scored.
Reports per scene (item) and overall."""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from bigseg.errors import DatasetError
from bigseg.io.gdal import gdal_env
from bigseg.metrics import scores
from bigseg.infer.predictor import Predictor
from bigseg.runtime import check_stop
from bigseg.train.data import DataSplit


@dataclass
class EvalResult:
    dataset: str
    split: str
    images: int
    seconds: float
    scores: dict
    confusion: np.ndarray
    per_scene: dict[str, dict] = field(default_factory=dict)

    def to_dict(self) -> dict:
        out = {"dataset": self.dataset, "split": self.split, "images": self.images,
               "seconds": round(self.seconds, 2), **self.scores, "confusion": self.confusion.tolist()}
        if self.per_scene:
            out["scenes"] = self.per_scene
        return out


def evaluate(predictor: Predictor, data: DataSplit, on_image: Callable[[int, int], None] | None = None
             ) -> EvalResult:
    """Confusion matrix, IoU per class, mIoU and pixel accuracy of `predictor` on `data`, overall
    and (for raster scenes) per scene."""
    classes = predictor.card.classes
    if len(classes) != len(data.classes):
        raise DatasetError(f"the model predicts {len(classes)} classes but the {data.name} data "
                           f"has {len(data.classes)}")
    start = time.perf_counter()
    n = len(classes)
    conf = np.zeros((n, n), np.int64)
    per_item: dict[int, np.ndarray] = {}
    with gdal_env():  # GDAL's block cache bounded, as in predict
        for done, region in enumerate(data.regions, 1):
            check_stop()
            c = data.source.confusion(predictor, region)  # as its kind of data is scored
            conf += c
            per_item[region.item] = per_item.get(region.item, 0) + c
            if on_image is not None:
                on_image(done, len(data.regions))
    named = {i: data.source.scene_name(i) for i in per_item}
    per_scene = {named[i]: scores(c, list(data.classes)) for i, c in per_item.items() if named[i] is not None}
    return EvalResult(data.name, data.split, len(data.regions), time.perf_counter() - start,
                      scores(conf, list(data.classes)), conf, per_scene)
