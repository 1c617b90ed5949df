"""One definition of training data: sources of items that read windows of image bands, label and
validity (image folders and raster scenes), regions that make up each split, and samplers that
choose the windows an epoch reads."""
from bigseg.train.data.classes import IGNORE, ClassTable
from bigseg.train.data.images import ImageSource
from bigseg.train.data.layouts import (
    LAYOUTS,
    DataSet,
    DataSettings,
    DataSplit,
    Layout,
    open_split,
    register_layout,
    split_names,
)
from bigseg.train.data.samplers import EpochView, RandomWindows, SamplerOptions, WholeImages
from bigseg.train.data.scenes import ReadSettings, Scene, SceneSource
from bigseg.train.data.source import Patch, Region, Source, label_statistics, region_windows
from bigseg.train.data.split import SplitSettings

__all__ = ["IGNORE", "LAYOUTS", "ClassTable", "DataSet", "DataSettings", "DataSplit", "EpochView", "ImageSource", "Layout", "Patch",
           "RandomWindows", "ReadSettings", "Region", "SamplerOptions", "Scene", "SceneSource", "Source", "SplitSettings",
           "WholeImages", "label_statistics", "open_split", "region_windows", "register_layout", "split_names"]
