"""Sources of small images, each read whole: augmentation scales and crops each whole image, an
epoch reads every image once, and a model is scored on each image read once and tiled from memory.
Image folders (`folders.py`) are one; a source of another format subclasses `ImageSource` and
defines how an image is read."""
from __future__ import annotations

import numpy as np

from bigseg.errors import TrainingError
from bigseg.metrics import confusion
from bigseg.train.data.samplers import SamplerOptions, WholeImages
from bigseg.train.data.source import Region, Source


class ImageSource(Source):
    """Small images read whole (subclasses set `name`, `table`, `channels` and define `read`)."""

    kind, unit, regions_are = "images", "images", "images"
    own_normalisation = False  # photographs keep the ImageNet normalisation the backbones were made for

    def extent(self, region: Region) -> None:
        return None  # each image is read whole

    def windows(self, region: Region, side: int) -> list[None]:
        return [None]

    def scene_name(self, item: int) -> None:
        return None  # one score over all the images

    def describe_regions(self, regions: list[Region]) -> dict:
        return {}

    def sampler(self, regions: list[Region], options: SamplerOptions) -> tuple[WholeImages, list[str]]:
        """Every image once an epoch (augmentation scales and crops each whole image)."""
        if options.rare_classes:
            raise TrainingError("--rare-class-sampling draws windows of raster scenes; the images of a folder are read "
                                "whole (--class-balance weighs rare classes in the loss instead)")
        if options.scene_balance:
            raise TrainingError("--scene-balance weighs raster scenes against each other; the images of a folder are "
                                "each read once an epoch")
        return WholeImages(regions), []

    def confusion(self, predictor, region: Region) -> np.ndarray:
        """A small image: read once and tiled from memory, scored where it has data."""
        patch = self.read(region.item)
        labels = predictor.scores(patch.image.astype(np.float32), patch.valid).argmax(0)
        return confusion(labels, patch.label, predictor.num_classes)
