"""Options shared by predict, eval and train, defined once, and the parsing of option values
into the library's types (which never import torch, so a bad value fails at once)."""
from __future__ import annotations

from typing import Annotated

import typer

from bigseg.errors import InputError

Model = Annotated[str, typer.Option("--model", "-m", metavar="NAME|FILE",
                                    help="Shipped model name (see `bigseg models`) or a .pt checkpoint.")]
Tile = Annotated[int, typer.Option(metavar="PX", help="Tile side in pixels.")]
Overlap = Annotated[int | None, typer.Option(
    metavar="PX", help="Tile overlap in pixels. Default: 4 x the model's context margin (at most tile/2), "
                       "tile/4 for models that see the whole tile.")]
BatchSize = Annotated[int, typer.Option("--batch-size", "-b", metavar="N", help="Tiles per forward pass.")]
Device = Annotated[str, typer.Option(metavar="DEVICE", help="auto, cpu, cuda or cuda:N.")]
Precision = Annotated[str, typer.Option(
    metavar="P", envvar="BIGSEG_PRECISION",
    help="auto (bf16 on a GPU and on a CPU with bf16 units, e.g. AMX; fp32 elsewhere), fp32, bf16 or fp16.")]
Scales = Annotated[str, typer.Option(metavar="S,...", help="Average softmax over these scales, e.g. 0.75,1,1.25,1.5.")]
Flip = Annotated[bool, typer.Option("--flip", help="Also average over horizontally mirrored tiles.")]
Rotate = Annotated[bool, typer.Option(
    "--rotate", help="Also average over tiles turned by 90, 180 and 270 degrees (imagery seen from above, "
                     "where no direction is up; with --flip, all eight turns and mirrors).")]
Crf = Annotated[str | None, typer.Option(metavar="BACKEND", help="Refine with a dense CRF: lattice or window.")]
CrfParams = Annotated[str | None, typer.Option(
    metavar="K=V,...", help="CRF settings, e.g. w1=4,theta_alpha=67,theta_beta=3,w2=3,theta_gamma=1,"
                            "iterations=10,radius=5,downsample=1.")]
Threads = Annotated[int | None, typer.Option(metavar="N", help="Compute threads. Default: one per core.")]
Engine = Annotated[str, typer.Option(
    metavar="NAME", envvar="BIGSEG_ENGINE",
    help="auto (torch on a GPU; on the CPU whichever of OpenVINO, ONNX Runtime and torch is faster here, "
         "timed once), torch, openvino or onnx.")]
Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="Print nothing but errors.")]
Bands = Annotated[str | None, typer.Option(metavar="B,...", help="1-based bands to use, in order, e.g. 1,2,3.")]
ValueRange = Annotated[str | None, typer.Option(
    metavar="LOW,HIGH", help="Map LOW..HIGH to the model's 0..255 for non-8-bit imagery (default: each band's "
                             "2nd..98th percentile).")]
# polygons and areas (predict --vector / --areas, vectorize)
Areas = Annotated[bool, typer.Option("--areas", help="Also write NAME.areas.csv: pixels, square metres, hectares "
                                                     "and share of each class (and areas in --json).")]
VectorClasses = Annotated[str | None, typer.Option(
    "--classes", metavar="NAME|VALUE,...", help="Polygons of these classes only (default: all).")]
MinArea = Annotated[float, typer.Option(
    metavar="M2", help="Drop regions smaller than this many square metres (pixels without a CRS).")]
Simplify = Annotated[float, typer.Option(
    metavar="UNITS", help="Simplify each polygon with this tolerance in map units (0: exact pixel edges; "
                          "neighbours' shared edges may part by up to it).")]
Connectivity = Annotated[int, typer.Option(metavar="4|8", help="Pixels touching at a corner are one region with 8.")]

# raster scenes as data (train and eval)
ClassField = Annotated[str | None, typer.Option(
    metavar="FIELD", help="Vector labels: the attribute holding each polygon's class (a value or a class name).")]
Layer = Annotated[str | None, typer.Option(metavar="NAME", help="Vector labels: the layer of a multi-layer file.")]
ValScenes = Annotated[str | None, typer.Option(
    metavar="NAME,...", help="Raster scenes: the validation scenes by name (image file stem). Default: by whole "
                             "scenes with two or more, else by spatial blocks.")]
ValBlock = Annotated[int, typer.Option(metavar="PX", help="One raster scene: side of the validation blocks.")]
ValBuffer = Annotated[int, typer.Option(metavar="PX", help="One raster scene: gap between training and "
                                                          "validation blocks.")]

# library parameter -> option, for errors that name a parameter
FLAGS = {"batch_size": "--batch-size", "io_threads": "--io-threads", "value_range": "--value-range",
         "crop_schedule": "--crop-schedule", "class_balance": "--class-balance"}


def parse_names(text: str | None) -> tuple[str, ...]:
    return tuple(n.strip() for n in (text or "").split(",") if n.strip())


def flag(param: str) -> str:
    return FLAGS.get(param, "--" + param.replace("_", "-"))


def parse_scales(text: str, param: str = "scales") -> tuple[float, ...]:
    try:
        return tuple(float(v) for v in text.replace(" ", "").split(","))
    except ValueError:
        raise InputError(f"takes factors like 0.75,1,1.25, got {text!r}", param=param) from None


def check_threads(threads: int | None) -> None:
    if threads is not None and threads < 1:
        raise InputError(f"must be at least 1, got {threads}", param="threads")
