"""`bigseg eval`: a model scored on a labelled split through the same tiled engine as predict."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import typer

from bigseg.cli import options as O
from bigseg.cli.predict import DEFAULT_MODEL
from bigseg.cli.render import out as console
from bigseg.crf.params import parse_crf
from bigseg.errors import InputError


def evaluate(
    data: Path = typer.Option(..., "--data", "-d", metavar="FOLDER|CSV",
                              help="Labelled data as for train (or a folder with only test/ + testannot/)."),
    model: O.Model = DEFAULT_MODEL,
    split: str = typer.Option("val", metavar="SPLIT", help="train, val or test (or joined, e.g. val+test); raster "
                              "scenes also take all (every scene, whole)."),
    out: Path | None = typer.Option(None, "--out", "-o", metavar="FILE",
                                    help="JSON report path. Default: MODEL.eval-<split>.json beside a model file; "
                                         "none for a shipped model."),
    tile: O.Tile = 1024,
    overlap: O.Overlap = None,
    batch_size: O.BatchSize = 4,
    device: O.Device = "auto",
    precision: O.Precision = "auto",
    scales: O.Scales = "1",
    flip: O.Flip = False,
    rotate: O.Rotate = False,
    crf: O.Crf = None,
    crf_params: O.CrfParams = None,
    threads: O.Threads = None,
    engine: O.Engine = "auto",
    bands: O.Bands = None,
    value_range: O.ValueRange = None,
    class_field: O.ClassField = None,
    layer: O.Layer = None,
    val_scenes: O.ValScenes = None,
    val_block: O.ValBlock = 1024,
    val_buffer: O.ValBuffer = 64,
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Print only the mIoU line."),
) -> None:
    """Score a model on a labelled split: per-class IoU, mIoU, pixel accuracy (JSON + table), per scene too."""
    from rich.table import Table

    from bigseg.atomic import write_text
    from bigseg.io.bands import parse_bands, parse_value_range

    scale_factors, crf_settings = O.parse_scales(scales), parse_crf(crf, crf_params)
    band_list, fixed_range = parse_bands(bands), parse_value_range(value_range)
    O.check_threads(threads)
    if not data.exists():  # a wrong path fails before the model loads
        raise InputError(f"data not found: {data}")

    from bigseg.checkpoint import resolve_model
    from bigseg.infer.engines.torch import resolve_device
    from bigseg.infer.predictor import Predictor
    from bigseg.runtime import keep_freed_memory, set_threads
    from bigseg.train.data import DataSet, DataSettings, ReadSettings, SplitSettings
    from bigseg.train.evaluation import evaluate as run_eval

    checkpoint = resolve_model(model)
    if precision == "auto" and device in ("auto", "cpu") and resolve_device(device).type == "cpu":
        precision = "fp32"  # scores comparable with training's validation (fp32 on the CPU), bf16 when asked
    trained = checkpoint.input  # a model trained on raster scenes reads them as it was trained
    read = ReadSettings(band_list or (tuple(trained["bands"]) if trained.get("bands") else None),
                        fixed_range or (tuple(trained["value_range"]) if trained.get("value_range") else None),
                        class_field, layer)
    dataset = DataSet(data, DataSettings(read, SplitSettings(O.parse_names(val_scenes), val_block, val_buffer)))
    for note in dataset.notes:
        print(f"note: {note}", file=sys.stderr)
    subset = dataset.split(split)
    set_threads(threads)
    keep_freed_memory()  # tiles of one shape: reuse their buffers instead of page-faulting afresh
    predictor = Predictor(checkpoint, device, precision, tile, overlap, batch_size, scale_factors, flip,
                          crf_settings, engine=engine, on_note=lambda message: print(f"note: {message}", file=sys.stderr),
                          turns=rotate)
    result = run_eval(predictor, subset)
    report = out or (Path(model).with_name(f"{Path(model).stem}.eval-{split}.json") if Path(model).is_file() else None)
    numbers = predictor.precision
    if report is not None:
        write_text(report, json.dumps({"model": model, "precision": numbers, "scales": list(predictor.scales),
                                       "flip": flip, "turns": rotate, "crf": None if predictor.crf is None else vars(predictor.crf),
                                       **result.to_dict()}, indent=1))
    s = result.scores
    if not quiet:
        table = Table(title=f"{subset.name} {split}: {result.images} "
                            f"{subset.source.regions_are}, {result.seconds:.1f} s")
        table.add_column("class")
        table.add_column("IoU %", justify="right")
        for name, iou in s["iou"].items():
            table.add_row(name, "-" if iou is None else f"{100 * iou:.2f}")
        console.print(table)
        for scene, scene_scores in result.per_scene.items():
            print(f"{scene}: mIoU {100 * scene_scores['miou']:.2f}  pixel accuracy "
                  f"{100 * scene_scores['pixel_accuracy']:.2f}  ({scene_scores['pixels']} pixels)")
    kept = f"report: {report}" if report is not None else "report not kept: --out FILE keeps it"
    print(f"mIoU {100 * s['miou']:.2f}  pixel accuracy {100 * s['pixel_accuracy']:.2f}  ({numbers}, "
          f"{predictor.device.split(':')[0]}; {kept})")
