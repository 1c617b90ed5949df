"""The `bigseg` command: parse options, call the library, print. Nothing else lives here."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import List, Optional

import typer

from bigseg import __version__
from bigseg.errors import BigsegError

app = typer.Typer(name="bigseg", help="Semantic segmentation of very large images.",
                  no_args_is_help=True, pretty_exceptions_enable=False)

DEFAULT_MODEL = "ladder-dn121"


def _version(value: bool) -> None:
    if value:
        print(f"bigseg {__version__}")
        raise typer.Exit()


@app.callback()
def root(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                      help="Print the version and exit.")) -> None:
    """Segment megapixel photos to gigapixel orthomosaics; train and evaluate the models."""


@app.command()
def models() -> None:
    """List the registered architectures: paper, parameters, shipped weights."""
    from rich.table import Table

    from bigseg.console import out
    from bigseg.models.complexity import architecture_rows

    table = Table(title="bigseg architectures (parameters at 19 classes, inference heads only)")
    for col in ("name", "paper", "params", "reference", "weights", "note"):
        table.add_column(col, no_wrap=col == "name")
    for row in architecture_rows():
        table.add_row(row["name"], row["paper"], f"{row['params'] / 1e6:.2f} M",
                      f"{row['reference_params'] / 1e6:.2f} M", "shipped" if row["shipped"] else "-",
                      row["note"])
    out.print(table)


@app.command()
def predict(
    inputs: List[str] = typer.Argument(..., help="Image files, folders or globs."),
    model: str = typer.Option(DEFAULT_MODEL, "--model", "-m", help="Shipped model name or a .pt checkpoint."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Output folder, or file for one input. Default: here."),
    recursive: bool = typer.Option(False, "--recursive", "-r", help="Look for images in subfolders."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Redo outputs that already exist."),
    tile: int = typer.Option(1024, help="Tile side in pixels."),
    overlap: Optional[int] = typer.Option(None, help="Tile overlap in pixels. Default: from the model "
                                          "(4 x its context margin), tile/4 for global-context models."),
    batch_size: int = typer.Option(4, "--batch-size", "-b", help="Tiles per forward pass."),
    device: str = typer.Option("auto", help="auto, cpu, cuda or cuda:N."),
    precision: str = typer.Option("auto", help="auto, fp32, bf16 or fp16 (fp16 on GPU only)."),
    bands: Optional[str] = typer.Option(None, help="1-based bands to use, in order, e.g. 1,2,3."),
    value_range: Optional[str] = typer.Option(None, help="LOW,HIGH mapped to 0..255 for non-8-bit input."),
    reader: str = typer.Option("auto", help="auto, gdal, tifffile or opencv."),
    scales: str = typer.Option("1", help="Average softmax over these scales, e.g. 0.75,1,1.25,1.5."),
    flip: bool = typer.Option(False, help="Also average over horizontally mirrored tiles."),
    crf: Optional[str] = typer.Option(None, help="Refine with a dense CRF: lattice or window."),
    crf_params: Optional[str] = typer.Option(None, help="CRF settings, e.g. w1=4,theta_alpha=67,theta_beta=3,"
                                             "w2=3,theta_gamma=1,iterations=10,radius=5,downsample=1."),
    probs: bool = typer.Option(False, help="Also write per-class probabilities (uint8, p*255)."),
    overlay: bool = typer.Option(False, help="Also write a colour preview over the image."),
    cog: bool = typer.Option(False, help="Write cloud-optimised GeoTIFFs with overviews."),
    compile_model: bool = typer.Option(False, "--compile", help="torch.compile the model (slow start, faster GPU tiles)."),
    io_threads: Optional[int] = typer.Option(None, "--io-threads", help="GDAL threads decoding input and compressing "
                                             "output blocks. Default: 1 on the CPU, up to 8 with a GPU."),
    seams: bool = typer.Option(False, "--seams", help="Report how often neighbouring tiles disagree in their overlaps."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Print nothing but errors."),
    json_summary: bool = typer.Option(False, "--json", help="Print a machine-readable summary on stdout."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the plan (tiles, outputs, peak memory) and stop."),
    estimate: bool = typer.Option(False, "--estimate", help="With --dry-run: time a short warm-up to estimate the run time."),
) -> None:
    """Segment images of any size into class masks, tile by tile, in bounded memory."""
    from bigseg.checkpoint import resolve_model
    from bigseg.console import TileProgress
    from bigseg.crf import parse_crf
    from bigseg.inference import ReadOptions, Segmenter, WriteOptions
    from bigseg.io.bands import parse_bands, parse_value_range
    from bigseg.jobs import run_predict

    from bigseg.sharding import device_for_rank, rank_from_env

    read = ReadOptions(parse_bands(bands), parse_value_range(value_range), reader)
    rank = rank_from_env()
    quiet = quiet or rank.rank > 0  # under torchrun, rank 0 speaks for everyone
    segmenter = Segmenter(resolve_model(model), device_for_rank(device, rank), precision, tile, overlap,
                          batch_size, _parse_scales(scales), flip, parse_crf(crf, crf_params), compile_model,
                          journal_seconds=float(os.environ.get("BIGSEG_JOURNAL_SECONDS", "5")), io_threads=io_threads)
    if dry_run:
        if rank.rank > 0:  # one plan is enough under torchrun
            return
        from bigseg.console import print_plans
        from bigseg.jobs import dry_run as plan_jobs

        plans, failed = plan_jobs(segmenter, inputs, out, recursive=recursive, read=read,
                                  write=WriteOptions(probs, overlay, cog, seams), estimate=estimate)
        print_plans(plans, json_summary)
        for failure in failed:
            _error_line(failure.error)
        if failed:
            raise typer.Exit(1)
        return
    progress = TileProgress(quiet or json_summary)

    def on_event(kind: str, payload) -> None:
        if kind == "start":
            progress.start(payload.input.name, tile * tile)
        elif kind == "tile":
            progress.tile(*payload)
        elif kind == "done":
            progress.finish()
            for n in payload.notes:
                progress.line(f"note: {payload.input.name}: {n}")
            if payload.seams is not None:
                s = payload.seams
                progress.line(f"seams: {payload.input.name}: neighbouring tiles disagree on {100 * s['rate']:.3f}% "
                              f"of {s['compared']} overlap pixels")
            progress.line(f"{payload.input} -> {payload.output} ({payload.width}x{payload.height}, "
                          f"{payload.tiles} tiles, {payload.seconds:.1f} s, "
                          f"{payload.megapixels / max(payload.seconds, 1e-9):.2f} MP/s)")
        elif kind == "skip":
            progress.line(f"{payload.input}: {payload.output} exists, skipped (--overwrite to redo)")
        elif kind == "fail":
            progress.finish()
            _error_line(payload.error)

    with progress:
        summary = run_predict(segmenter, inputs, out, recursive=recursive, overwrite=overwrite,
                              read=read, write=WriteOptions(probs, overlay, cog, seams), on_event=on_event)
    for failure in summary.failed:
        _error_line(failure.error)
    _report(summary, quiet, json_summary and rank.rank == 0)
    if not summary.ok:
        raise typer.Exit(1)


@app.command()
def train(
    ctx: typer.Context,
    data: Optional[Path] = typer.Option(None, "--data", "-d", help="Data folder: Cityscapes, CamVid or images/+masks/."),
    model: str = typer.Option("ladder-dn121", "--model", "-m", help="Architecture name (see `bigseg models`)."),
    run: Path = typer.Option(Path("runs/latest"), "--run", help="Run folder for checkpoints and logs."),
    resume: bool = typer.Option(False, help="Continue the run in --run exactly where it stopped."),
    epochs: int = typer.Option(100, help="Epochs."),
    batch_size: int = typer.Option(8, "--batch-size", "-b", help="Images per step and process."),
    crop: int = typer.Option(448, help="Square training crop in pixels."),
    scale_min: float = typer.Option(0.5, help="Random scale range, lower end."),
    scale_max: float = typer.Option(2.0, help="Random scale range, upper end."),
    jitter: float = typer.Option(0.0, help="Photometric jitter (relative brightness/contrast/saturation)."),
    optimizer: str = typer.Option("adam", help="adam or sgd."),
    lr: float = typer.Option(4e-4, help="Peak learning rate."),
    weight_decay: float = typer.Option(1e-4, help="Weight decay."),
    schedule: str = typer.Option("cosine", help="cosine or poly."),
    backbone_weights: Optional[Path] = typer.Option(None, help="torchvision DenseNet ImageNet state dict (.pth)."),
    grad_checkpoint: bool = typer.Option(True, help="Recompute activations in backward to save memory."),
    aux_weight: float = typer.Option(0.4, help="Weight of the auxiliary losses (ladder models)."),
    spp_width: Optional[int] = typer.Option(None, help="SPP fuse width (default D/4 as in the paper; authors' code 512)."),
    model_config: Optional[str] = typer.Option(
        None, "--model-config", metavar="KEY=VALUE,...",
        help="Architecture settings, e.g. output_stride=8 or budget_lambda=0.5,budget_mu=0.2 (tuples: 6/12/18)."),
    device: str = typer.Option("auto", help="auto, cpu, cuda or cuda:N."),
    precision: str = typer.Option("auto", help="auto (bf16 on GPU), fp32, bf16 or fp16."),
    workers: int = typer.Option(2, help="Data loading processes."),
    seed: int = typer.Option(0, help="Random seed (data order, augmentation, initialisation)."),
    eval_every: int = typer.Option(1, help="Validate every N epochs (0: never)."),
    val_split: str = typer.Option("val", help="Split used for model selection."),
    sync_bn: bool = typer.Option(False, help="SyncBatchNorm across processes under torchrun."),
    recompute_bn: int = typer.Option(0, help="After training, recompute BN statistics over N batches."),
    max_steps: Optional[int] = typer.Option(None, help="Stop after this many steps (resumable)."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Print nothing but errors."),
) -> None:
    """Train a model; checkpoints every epoch and on Ctrl-C, resumable, keeps the best by val mIoU."""
    from bigseg.console import TrainProgress
    from bigseg.errors import InputError
    from bigseg.train.loop import load_run_config, train as run_training

    if resume:
        given = {name for name in ctx.params
                 if getattr(ctx.get_parameter_source(name), "name", "") == "COMMANDLINE"}
        changes = {k: ctx.params[k] for k in given - {"run", "resume", "quiet"}}
        cfg = load_run_config(run, **changes)
    elif data is None:
        raise InputError("--data is required (a Cityscapes, CamVid or images/+masks/ folder)")
    else:
        cfg = _new_run_config(**{k: v for k, v in ctx.params.items() if k not in ("resume", "quiet")})
    with TrainProgress(quiet, cfg.epochs) as progress:
        result = run_training(cfg, resume=resume, on_event=progress.event)
    if not quiet:
        best = "n/a" if result.best_miou is None else f"{100 * result.best_miou:.2f}"
        where = result.run_dir / ("best.pt" if result.stopped == "finished" else "last.pt")
        print(f"{result.stopped}: {result.epochs_done} epochs, {result.steps_done} steps, best val mIoU {best}; "
              f"{'model' if result.stopped == 'finished' else 'run checkpoint'}: {where}", file=sys.stderr)


def _new_run_config(data, model, run, epochs, batch_size, crop, scale_min, scale_max, jitter, optimizer, lr,
                    weight_decay, schedule, backbone_weights, grad_checkpoint, aux_weight, spp_width, model_config,
                    device, precision, workers, seed, eval_every, val_split, sync_bn, recompute_bn, max_steps):
    from bigseg.models.registry import parse_model_config, validate_config
    from bigseg.train.loop import TrainConfig

    arch_config = parse_model_config(model_config or "")
    if spp_width is not None:
        arch_config["spp_width"] = spp_width
    validate_config(model, arch_config)
    return TrainConfig(data=str(data), run_dir=str(run), arch=model, arch_config=arch_config, epochs=epochs,
                      batch_size=batch_size, crop=crop, scale_min=scale_min, scale_max=scale_max,
                      jitter=jitter, optimizer=optimizer, lr=lr, weight_decay=weight_decay, schedule=schedule,
                      backbone_weights=str(backbone_weights) if backbone_weights else None,
                      grad_checkpoint=grad_checkpoint, aux_weight=aux_weight, device=device,
                      precision=precision, workers=workers, seed=seed, eval_every=eval_every,
                      val_split=val_split, sync_bn=sync_bn, recompute_bn=recompute_bn, max_steps=max_steps)


@app.command(name="eval")
def evaluate(
    data: Path = typer.Option(..., "--data", "-d", help="Labelled data folder (as for train)."),
    model: str = typer.Option(DEFAULT_MODEL, "--model", "-m", help="Shipped model name or a .pt checkpoint."),
    split: str = typer.Option("val", help="train, val or test."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="JSON report path. Default: eval-<split>.json."),
    tile: int = typer.Option(1024, help="Tile side in pixels."),
    overlap: Optional[int] = typer.Option(None, help="Tile overlap in pixels. Default: tile/4."),
    batch_size: int = typer.Option(4, "--batch-size", "-b", help="Tiles per forward pass."),
    device: str = typer.Option("auto", help="auto, cpu, cuda or cuda:N."),
    precision: str = typer.Option("auto", help="auto, fp32, bf16 or fp16."),
    scales: str = typer.Option("1", help="Average softmax over these scales, e.g. 0.75,1,1.25,1.5."),
    flip: bool = typer.Option(False, help="Also average over horizontally mirrored images."),
    crf: Optional[str] = typer.Option(None, help="Refine with a dense CRF: lattice or window."),
    crf_params: Optional[str] = typer.Option(None, help="CRF settings (see predict --help)."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Print only the mIoU line."),
) -> None:
    """Score a model on a labelled split: per-class IoU, mIoU, pixel accuracy (JSON + table)."""
    from rich.table import Table

    from bigseg.checkpoint import resolve_model
    from bigseg.console import out as console
    from bigseg.crf import parse_crf
    from bigseg.evaluation import evaluate as run_eval
    from bigseg.inference import Segmenter
    from bigseg.train.datasets import open_dataset

    dataset = open_dataset(data, split)
    segmenter = Segmenter(resolve_model(model), device, precision, tile, overlap, batch_size,
                          _parse_scales(scales), flip, parse_crf(crf, crf_params))
    result = run_eval(segmenter, dataset, split)
    report = out or Path(f"eval-{split}.json")
    report.write_text(json.dumps({"model": model, "scales": list(segmenter.scales), "flip": flip,
                                  "crf": None if segmenter.crf is None else segmenter.crf.__dict__,
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


def _parse_scales(text: str) -> tuple[float, ...]:
    from bigseg.errors import InputError

    try:
        return tuple(float(v) for v in text.replace(" ", "").split(","))
    except ValueError:
        raise InputError(f"--scales takes factors like 0.75,1,1.25, got {text!r}") from None


def _report(summary, quiet: bool, as_json: bool) -> None:
    if as_json:
        print(json.dumps({
            "done": [{"input": str(r.input), "output": str(r.output), "extras": [str(p) for p in r.extras],
                      "width": r.width, "height": r.height, "tiles": r.tiles, "seconds": round(r.seconds, 3),
                      "notes": r.notes, **({"seams": r.seams} if r.seams is not None else {}),
                      **({"gpu_peak_mib": round(r.gpu_peak_mib, 1)} if r.gpu_peak_mib is not None else {})}
                     for r in summary.done],
            "skipped": [{"input": str(j.input), "output": str(j.output)} for j in summary.skipped],
            "failed": [{"input": f.input, "error": f.error} for f in summary.failed],
        }, indent=2))
        return
    total = len(summary.done) + len(summary.skipped) + len(summary.failed)
    if total > 1 and not quiet:
        print(f"{len(summary.done)} done, {len(summary.skipped)} skipped, {len(summary.failed)} failed",
              file=sys.stderr)


_printed: set[str] = set()


def _error_line(message: str) -> None:
    from bigseg.console import error

    if message and message not in _printed:
        _printed.add(message)
        error(message)


def main() -> None:
    """Console-script entry: user mistakes become one `Error:` line and exit code 1."""
    try:
        app(prog_name="bigseg")
    except BigsegError as e:
        _error_line(str(e))
        sys.exit(1)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
