"""A training run's setup, before its first step: every setting checked at once (one clear error
naming the option), the data asked of the one data definition (`bigseg.train.data`: splits,
sampler, normalisation, class weights, the teacher's targets, an on-device copy), the model and
its optimisation. `loop.py` then only runs the steps."""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from bigseg import distributed as D
from bigseg.checkpoint import (Normalization, load_backbone_weights, load_checkpoint, pretrained_normalization,
                               weights_mismatch)
from bigseg.infer.engines.torch import resolve_device, resolve_precision
from bigseg.errors import Interrupted, TrainingError
from bigseg.models import create_model
from bigseg.runtime import set_threads, stop_handled
from bigseg.train.config import TrainConfig, check_crops
from bigseg.train.data import (
    DataSet,
    DataSettings,
    DataSplit,
    RandomWindows,
    ReadSettings,
    SamplerOptions,
    SplitSettings,
    WholeImages,
    label_statistics,
)
from bigseg.train.device_data import DeviceData
from bigseg.train.losses import BALANCING, class_weights
from bigseg.train.teacher import TeacherTargets, prepare_teacher

STATISTICS_WINDOWS = 64   # windows of a scene split sampled for the bands' mean and spread
STATISTICS_SIDE = 256


def check_settings(cfg: TrainConfig) -> None:
    """Every setting that can be wrong on its own, refused before any work: one error naming it."""
    def need(ok: bool, param: str, message: str) -> None:
        if not ok:
            raise TrainingError(message, param=param)

    need(cfg.epochs >= 1, "epochs", f"must be at least 1, got {cfg.epochs}")
    need(cfg.batch_size >= 1, "batch_size", f"must be at least 1, got {cfg.batch_size}")
    need(cfg.crop >= 16, "crop", f"must be at least 16 pixels, got {cfg.crop}")
    need(0 < cfg.scale_min <= cfg.scale_max <= 8, "scale_min",
         f"and --scale-max must satisfy 0 < min <= max <= 8, got {cfg.scale_min} and {cfg.scale_max}")
    for name in ("jitter", "colour_jitter", "gamma"):
        value = getattr(cfg, name)
        need(0 <= value < 1, name, f"must be at least 0 and below 1, got {value}")
    need(cfg.optimizer in ("adam", "adamw", "sgd"), "optimizer", f"must be adam, adamw or sgd, got {cfg.optimizer!r}")
    need(cfg.schedule in ("cosine", "poly"), "schedule", f"must be cosine or poly, got {cfg.schedule!r}")
    need(cfg.lr > 0, "lr", f"must be above 0, got {cfg.lr}")
    need(cfg.class_balance in BALANCING, "class_balance",
         f"must be one of {', '.join(BALANCING)}, got {cfg.class_balance!r}")
    need(0 <= cfg.lovasz <= 10, "lovasz", f"is a loss weight from 0 to 10, got {cfg.lovasz}")
    need(0 <= cfg.rare_class_sampling <= 10, "rare_class_sampling",
         f"is a temperature from 0 (off) to 10, got {cfg.rare_class_sampling}")
    need(0 <= cfg.scene_balance <= 1, "scene_balance",
         f"is from 0 (scenes drawn by area) to 1 (every scene alike), got {cfg.scene_balance}")
    need(not cfg.freeze_bn or bool(cfg.init), "freeze_bn", "keeps a trained model's batchnorm statistics: "
         "it needs --init (a new model's statistics are 0 and 1)")
    need(0 <= cfg.ema < 1, "ema", f"is a decay per step, at least 0 (off) and below 1, got {cfg.ema}")
    for name, scales in (("val_scales", cfg.val_scales), ("teacher_scales", cfg.teacher_scales if cfg.teacher else (1.0,))):
        need(bool(scales) and all(0.1 <= s <= 4 for s in scales), name,
             f"must be factors between 0.1 and 4, got {scales}")
    if cfg.teacher:
        need(0 < cfg.distil <= 10, "distil", f"is a loss weight above 0 and at most 10, got {cfg.distil}")
        need(not cfg.data_on_device, "teacher", "reads the teacher's targets from the run folder in the data "
             "workers; it does not combine with --data-on-device")
    need(cfg.teacher_reduction >= 1, "teacher_reduction", f"must be at least 1, got {cfg.teacher_reduction}")
    need(cfg.eval_every >= 0, "eval_every", f"must be 0 (never) or more, got {cfg.eval_every}")
    need(cfg.recompute_bn >= 0, "recompute_bn", f"must be 0 (off) or more, got {cfg.recompute_bn}")
    need(cfg.workers >= 0, "workers", f"must be 0 or more, got {cfg.workers}")
    need(cfg.windows_per_epoch is None or cfg.windows_per_epoch >= 1, "windows_per_epoch",
         f"must be at least 1, got {cfg.windows_per_epoch}")
    need(cfg.max_steps is None or cfg.max_steps >= 0, "max_steps", f"must be 0 or more, got {cfg.max_steps}")
    need(cfg.val_block >= 64, "val_block", f"must be at least 64 pixels, got {cfg.val_block}")
    need(cfg.val_buffer >= 0, "val_buffer", f"must be 0 or more pixels, got {cfg.val_buffer}")
    need(cfg.pixel_size is None or 0 < cfg.pixel_size < math.inf, "pixel_size",
         f"must be a ground pixel size in metres above 0, got {cfg.pixel_size}")
    with torch.device("meta"):  # the model's padding multiple, without allocating or drawing weights
        probe = create_model(cfg.arch, 2, 3, **cfg.arch_config)
    check_crops(cfg, getattr(probe, "output_multiple", 1))


@dataclass
class Environment:
    """Where the run computes: device, autocast precision, threads, and its torchrun rank."""

    device: torch.device
    dtype: torch.dtype
    threads: int
    rank: D.Rank


def environment(cfg: TrainConfig) -> Environment:
    device = resolve_device(cfg.device)
    dtype = resolve_precision(cfg.precision, device, cpu_bf16=False)
    threads = set_threads(cfg.threads)
    d = D.rank_from_env()
    D.init(d, "nccl" if device.type == "cuda" else "gloo")
    if d.active and device.type == "cuda":
        device = torch.device("cuda", d.local_rank)
        torch.cuda.set_device(device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # every step of a phase has the same crop: autotune once
    return Environment(device, dtype, threads, d)


@dataclass
class TrainingData:
    """What the loop reads: the training split and its sampler, the validation split, and what
    was computed from the data once (`prepared`, kept in the run checkpoint: class weights, the
    bands' normalisation, a model's fitted parts)."""

    train: DataSplit
    val: DataSplit | None
    sampler: WholeImages | RandomWindows
    steps_per_epoch: int
    notes: list[str]
    input: dict[str, Any]
    prepared: dict[str, Any] = field(default_factory=dict)
    targets: TeacherTargets | None = None
    device_data: DeviceData | None = None

    @property
    def normalization(self) -> Normalization:
        norm = self.prepared.get("normalization")
        return Normalization() if norm is None else Normalization(list(norm["mean"]), list(norm["std"]))

    @property
    def source(self):
        return self.train.source


def open_data(cfg: TrainConfig, world: int = 1) -> TrainingData:
    """The splits of `cfg.data` and the sampler of the training split; refused where validation
    would score pixels the model trained on, or where there is not one batch."""
    settings = DataSettings(ReadSettings(tuple(cfg.bands) if cfg.bands else None,
                                         tuple(cfg.value_range) if cfg.value_range else None, cfg.class_field, cfg.layer),
                            SplitSettings(tuple(cfg.val_scenes), cfg.val_block, cfg.val_buffer))
    dataset = DataSet(cfg.data, settings)
    train = dataset.split(cfg.train_split)
    val = dataset.split(cfg.val_split) if cfg.eval_every > 0 else None
    if val is not None and not dataset.check_disjoint(train, val):
        raise TrainingError(f"--val-split {cfg.val_split} overlaps --train-split {cfg.train_split}: its mIoU would "
                            f"select on training images; use --eval-every 0 (the last epoch is the model) "
                            f"or another --val-split")
    options = SamplerOptions(cfg.crop, cfg.teacher_reduction if cfg.teacher else 1, cfg.rare_class_sampling,
                             cfg.scene_balance, cfg.windows_per_epoch or None, cfg.batch_size * world)
    sampler, notes = train.source.sampler(train.regions, options)
    unit = train.source.unit
    steps = len(sampler) // (cfg.batch_size * world)
    if steps == 0:
        raise TrainingError(f"{len(sampler)} training {unit} are fewer than one batch of {cfg.batch_size} x {world} "
                            f"process(es); lower --batch-size" + (" or raise --windows-per-epoch" if unit == "windows" else ""))
    return TrainingData(train, val, sampler, steps, list(dataset.notes) + notes, input_description(train, cfg))


def input_description(train: DataSplit, cfg: TrainConfig) -> dict[str, Any]:
    """What a checkpoint says of its input, for predict: the bands, the ground pixel size and the
    label values of the classes (raster scenes); nothing for image folders (RGB photographs) but
    the pixel size `--pixel-size` states for imagery that does not say its own."""
    described = train.source.input_description(train.regions, tuple(cfg.value_range) if cfg.value_range else None)
    if cfg.pixel_size is None:
        return described
    known, units = described.get("pixel_size"), described.get("units")
    if known and not (units == "metre" and math.isclose(known[0], cfg.pixel_size, rel_tol=0.01)):
        raise TrainingError(f"{cfg.pixel_size:g} m, but the training imagery says its pixels are {known[0]:g} "
                            f"{units}; --pixel-size is for imagery without a ground pixel size", param="pixel_size")
    return {**described, "pixel_size": [cfg.pixel_size, cfg.pixel_size], "units": "metre"}


def prepare(data: TrainingData, cfg: TrainConfig, net: nn.Module, computed_normalization: bool = True) -> dict[str, Any]:
    """What is computed from the training data once, before the first step of a new run: a model's
    fitted parts (DUpsampling's W), the class weights, and for raster scenes the bands' mean and
    spread (images from folders keep the ImageNet normalisation the backbones were made for; a run
    from `--init` takes its checkpoint's, and one with ImageNet weights its encoder's, instead:
    `computed_normalization=False`)."""
    prepared = net.prepare_training(LabelWindows(data.train), cfg.seed) if hasattr(net, "prepare_training") else {}
    if computed_normalization and data.source.own_normalisation:
        prepared = {**prepared, "normalization": band_statistics(data, cfg.seed)}
    weights = class_weights(*label_statistics(data.source, data.train.regions, len(data.train.classes)),
                            cfg.class_balance)
    if weights is not None:
        prepared = {**prepared, "class_weights": weights}
    return prepared


class LabelWindows:
    """The training labels as a sequence: whole images, or 512-pixel grid windows of scenes."""

    def __init__(self, data: DataSplit, side: int = 512):
        self.source = data.source
        self.keys = [(r.item, w) for r in data.regions for w in self.source.windows(r, side)]

    def __len__(self) -> int:
        return len(self.keys)

    def __getitem__(self, i: int) -> np.ndarray:
        return self.source.read_label(*self.keys[i])


def band_statistics(data: TrainingData, seed: int) -> dict[str, list[float]]:
    """Each band's mean and standard deviation (in the readers' 0..255 units) over the valid pixels
    of `STATISTICS_WINDOWS` random windows of the training regions, drawn as training draws them."""
    sampler: RandomWindows = data.sampler
    rng = np.random.default_rng([seed, 7919])
    total = squares = count = 0
    for _ in range(STATISTICS_WINDOWS):
        item, window, _ = sampler.draw(rng, STATISTICS_SIDE, 1.0, 1.0)
        patch = data.source.read(item, window)
        pixels = patch.image[:, patch.valid].astype(np.float64)
        total = total + pixels.sum(1)
        squares = squares + (pixels ** 2).sum(1)
        count += pixels.shape[1]
    mean = total / max(count, 1)
    std = np.sqrt(np.maximum(squares / max(count, 1) - mean ** 2, 0))
    return {"mean": [round(float(m), 4) for m in mean], "std": [round(float(max(s, 1.0)), 4) for s in std]}


def prepare_targets(cfg: TrainConfig, data: TrainingData, run_dir, device, d: D.Rank,
                    on_event: Callable[[str, dict], None]) -> TeacherTargets | None:
    if not cfg.teacher:
        return None
    try:
        return prepare_teacher(cfg.teacher, data.train, run_dir, device, cfg.teacher_scales, cfg.teacher_flip,
                               cfg.val_tile, d, on_event, reduction=cfg.teacher_reduction, turns=cfg.teacher_turns)
    except KeyboardInterrupt:
        stop_handled()
        raise Interrupted(f"interrupted while computing the teacher's targets: those done are kept in "
                          f"{run_dir / 'teacher'}; run the same command again to continue") from None


def build_model(cfg: TrainConfig, data: TrainingData, new: bool) -> tuple[nn.Module, set[str]]:
    """The network and the names of its parameters loaded from ImageNet weights; a `new` run also
    gets what is computed from the data before the first step (`data.prepared`) and `--init`."""
    net = create_model(cfg.arch, len(data.train.classes), data.source.channels, **cfg.arch_config)
    pretrained: set[str] = set()
    if cfg.backbone_weights:
        pretrained = set(load_backbone_weights(net, cfg.backbone_weights))
    if new:
        data.prepared = prepare(data, cfg, net, computed_normalization=not (cfg.init or pretrained))
        if pretrained:  # the encoder sees its inputs as its ImageNet training did
            norm = pretrained_normalization(net)
            data.prepared["normalization"] = {"mean": list(norm.mean), "std": list(norm.std)}
        if cfg.init:
            norm = load_init(net, cfg, data.train.classes)
            data.prepared["normalization"] = {"mean": list(norm.mean), "std": list(norm.std)}
    return net, pretrained


def load_init(net: nn.Module, cfg: TrainConfig, classes: list[str]) -> Normalization:
    """Start from the weights of a bigseg checkpoint (same architecture and classes); returns the
    normalisation those weights were trained with, which the run keeps (its inputs must look as
    they did to the weights)."""
    ckpt = load_checkpoint(cfg.init)
    if ckpt.arch != cfg.arch or ckpt.classes != classes:
        raise TrainingError(f"init {cfg.init} is a {ckpt.arch} for {len(ckpt.classes)} classes "
                            f"({', '.join(ckpt.classes[:3])}, ...); this run trains a {cfg.arch} for "
                            f"{len(classes)} classes ({', '.join(classes[:3])}, ...)")
    same = json.dumps(ckpt.config, sort_keys=True, default=list) == json.dumps(net.config.to_dict(), sort_keys=True,
                                                                               default=list)
    state = {k: v.float() if v.is_floating_point() else v for k, v in ckpt.state_dict.items()}
    if not same or ckpt.in_channels != net.in_channels or weights_mismatch(net.state_dict(), state):
        raise TrainingError(f"init {cfg.init} was built with another {cfg.arch} configuration")
    net.load_state_dict(state)  # into the run's own network: no second model is built
    return ckpt.normalization


def schedule(cfg: TrainConfig, total_steps: int) -> Callable[[int], float]:
    floor = cfg.min_lr / cfg.lr

    def factor(step: int) -> float:
        t = min(step / max(total_steps, 1), 1.0)
        if cfg.schedule == "poly":
            return floor + (1 - floor) * (1 - t) ** 0.9
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * t))
    return factor


def optimizer(cfg: TrainConfig, model: nn.Module, pretrained: set[str]) -> torch.optim.Optimizer:
    fresh = [p for n, p in model.named_parameters() if n not in pretrained]
    loaded = [p for n, p in model.named_parameters() if n in pretrained]
    f = cfg.pretrained_lr_factor
    groups = [{"params": fresh, "lr": cfg.lr, "weight_decay": cfg.weight_decay}]
    if loaded:
        groups.append({"params": loaded, "lr": cfg.lr * f, "weight_decay": cfg.weight_decay * f})
    if cfg.optimizer == "adam":  # SwiftNet's: Adam, betas (0.9, 0.99), L2 weight decay
        return torch.optim.Adam(groups, betas=(0.9, 0.99))
    if cfg.optimizer == "adamw":  # decoupled weight decay (Loshchilov & Hutter 2019)
        return torch.optim.AdamW(groups, betas=(0.9, 0.99))
    return torch.optim.SGD(groups, momentum=0.9)
