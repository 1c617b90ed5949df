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


def evaluate(
    data: Path = typer.Option(..., "--data", "-d", metavar="FOLDER",
                              help="Labelled data folder (as for train, or only test/ + testannot/)."),
    model: O.Model = DEFAULT_MODEL,
    split: str = typer.Option("val", metavar="SPLIT", help="train, val or test (or joined, e.g. val+test)."),
    out: Path | None = typer.Option(None, "--out", "-o", metavar="FILE", help="JSON report path. Default: eval-<split>.json."),
    tile: O.Tile = 1024,
    overlap: O.Overlap = None,
    batch_size: O.BatchSize = 4,
    device: O.Device = "auto",
    precision: O.Precision = "auto",
    scales: O.Scales = "1",
    flip: O.Flip = False,
    crf: O.Crf = None,
    crf_params: O.CrfParams = None,
    threads: O.Threads = None,
    engine: O.Engine = "auto",
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Print only the mIoU line."),
) -> None:
    """Score a model on a labelled split: per-class IoU, mIoU, pixel accuracy (JSON + table)."""
    from rich.table import Table

    from bigseg.atomic import write_text
    from bigseg.datasets import open_dataset

    scale_factors, crf_settings = O.parse_scales(scales), parse_crf(crf, crf_params)
    O.check_threads(threads)
    dataset = open_dataset(data, split)  # a wrong folder fails before the model loads

    from bigseg.checkpoint import resolve_model
    from bigseg.evaluation import evaluate as run_eval
    from bigseg.predictor import Predictor
    from bigseg.runtime import keep_freed_memory, set_threads

    set_threads(threads)
    keep_freed_memory()  # tiles of one shape: reuse their buffers instead of page-faulting afresh
    predictor = Predictor(resolve_model(model), device, precision, tile, overlap, batch_size, scale_factors, flip,
                          crf_settings, engine=engine, on_note=lambda message: print(f"note: {message}", file=sys.stderr))
    result = run_eval(predictor, dataset, split)
    report = out or Path(f"eval-{split}.json")
    write_text(report, json.dumps({"model": model, "scales": list(predictor.scales), "flip": flip,
                                   "crf": None if predictor.crf is None else vars(predictor.crf),
                                   **result.to_dict()}, indent=1))
    s = result.scores
    if not quiet:
        table = Table(title=f"{dataset.name} {split}: {result.images} images, {result.seconds:.1f} s")
        table.add_column("class")
        table.add_column("IoU %", justify="right")
        for name, iou in s["iou"].items():
            table.add_row(name, "-" if iou is None else f"{100 * iou:.2f}")
        console.print(table)
    print(f"mIoU {100 * s['miou']:.2f}  pixel accuracy {100 * s['pixel_accuracy']:.2f}  ({report})")
