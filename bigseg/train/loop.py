"""The training loop, top to bottom in one function (`train`), plus its run-checkpoint state.

A run folder holds: `last.pt` (run checkpoint: model, optimizer, scheduler, scaler, RNG states,
epoch and step, written atomically every epoch and on Ctrl-C or SIGTERM), `best.pt` (the best model by
validation mIoU, a self-describing checkpoint `predict` loads), `log.csv`/`log.json` (per-epoch
metrics) and `curves.png`.
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from bigseg import distributed as D
from bigseg.atomic import atomic_path, write_text
from bigseg.checkpoint import (
    Checkpoint,
    Normalization,
    from_model,
    load_backbone_weights,
    load_checkpoint,
    save_checkpoint,
)
from bigseg.datasets import label_statistics, open_dataset
from bigseg.device import resolve_device, resolve_precision
from bigseg.errors import BigsegError, Interrupted, TrainingError
from bigseg.evaluation import evaluate
from bigseg.models import create_model
from bigseg.models.blocks import set_grad_checkpointing
from bigseg.predictor import Predictor
from bigseg.runtime import (
    check_stop,
    ignore_terminate,
    set_threads,
    stop_handled,
    whole_step,
)
from bigseg.train.config import DEFAULTS, RESUMABLE, TrainConfig, check_crops, crop_at
from bigseg.train.device_data import DeviceData
from bigseg.train.losses import BALANCING, class_weights, distil_loss, model_loss
from bigseg.train.plot import plot_curves
from bigseg.train.teacher import prepare_teacher
from bigseg.train.transforms import Augment, AugmentedView

RUN_FORMAT = "bigseg-run"


@dataclass
class TrainResult:
    run_dir: Path
    epochs_done: int
    steps_done: int
    best_miou: float | None
    losses: list[float]
    stopped: str  # "finished", "max_steps" or "interrupted"




def load_run_config(run_dir: str | Path, **changes: Any) -> TrainConfig:
    """The settings of the run in `run_dir`, with `changes` to the RESUMABLE ones."""
    path = Path(run_dir) / "last.pt"
    if not path.is_file():
        raise TrainingError(f"nothing to resume: {path} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        config = dict(state["config"])
    except Exception as e:  # torch.load raises many types for damaged files
        raise TrainingError(f"{path} is not a readable bigseg run checkpoint ({type(e).__name__})") from None
    bad = sorted(set(changes) - set(RESUMABLE))
    if bad:
        raise TrainingError(f"cannot change when resuming (the run uses {config.get(bad[0])!r}); "
                            f"start a new run instead", param=bad[0])
    return TrainConfig(**{**config, **changes})


def _augmentation(cfg: TrainConfig, epoch: int) -> Augment:
    """The augmentation of `epoch` (0-based): its crop under the crop schedule, the run's ranges."""
    return Augment(crop_at(cfg, epoch), cfg.scale_min, cfg.scale_max, cfg.flip, cfg.jitter, cfg.colour_jitter,
                   cfg.gamma)


def _schedule(cfg: TrainConfig, total_steps: int) -> Callable[[int], float]:
    floor = cfg.min_lr / cfg.lr

    def factor(step: int) -> float:
        t = min(step / max(total_steps, 1), 1.0)
        if cfg.schedule == "poly":
            return floor + (1 - floor) * (1 - t) ** 0.9
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * t))
    return factor


def _optimizer(cfg: TrainConfig, model: nn.Module, pretrained: set[str]) -> torch.optim.Optimizer:
    fresh = [p for n, p in model.named_parameters() if n not in pretrained]
    loaded = [p for n, p in model.named_parameters() if n in pretrained]
    f = cfg.pretrained_lr_factor
    groups = [{"params": fresh, "lr": cfg.lr, "weight_decay": cfg.weight_decay}]
    if loaded:
        groups.append({"params": loaded, "lr": cfg.lr * f, "weight_decay": cfg.weight_decay * f})
    if cfg.optimizer == "adam":
        return torch.optim.Adam(groups, betas=(0.9, 0.99))
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, momentum=0.9)
    raise TrainingError(f"unknown optimizer {cfg.optimizer!r}; use adam or sgd")


def _rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _save_run(path: Path, **state: Any) -> None:
    with atomic_path(path) as tmp:
        torch.save({"format": RUN_FORMAT, **state}, tmp)


def _load_run_state(path: Path, cfg: TrainConfig) -> dict[str, Any]:
    """The run checkpoint at `path`, refused when a non-resumable setting differs from `cfg`."""
    if not path.is_file():
        raise TrainingError(f"nothing to resume: {path} does not exist")
    state = torch.load(path, map_location="cpu", weights_only=True)
    if state.get("format") != RUN_FORMAT:
        raise TrainingError(f"{path} is not a bigseg run checkpoint")
    saved = {k: v for k, v in state["config"].items() if k not in RESUMABLE}
    mine = asdict(cfg)
    changed = sorted(k for k in set(saved) | set(mine) - set(RESUMABLE)
                     if json.dumps(saved.get(k, DEFAULTS.get(k))) != json.dumps(mine.get(k)))
    if changed:
        raise TrainingError(f"cannot resume with different settings: {', '.join(changed)}")
    return state


def _load_init(net: nn.Module, cfg: TrainConfig, classes: list[str]) -> None:
    """Start from the weights of a bigseg checkpoint (same architecture and classes)."""
    ckpt = load_checkpoint(cfg.init)
    if ckpt.arch != cfg.arch or ckpt.classes != classes:
        raise TrainingError(f"init {cfg.init} is a {ckpt.arch} for {len(ckpt.classes)} classes "
                            f"({', '.join(ckpt.classes[:3])}, ...); this run trains a {cfg.arch} for "
                            f"{len(classes)} classes ({', '.join(classes[:3])}, ...)")
    source = ckpt.build_model()
    if source.config.to_dict() != net.config.to_dict():
        raise TrainingError(f"init {cfg.init} was built with another {cfg.arch} configuration")
    net.load_state_dict(source.state_dict())


def _loader(view: AugmentedView, cfg: TrainConfig, start: int) -> torch.utils.data.DataLoader:
    """Batches of `view` in order from sample `start` (a resumed epoch skips what it has done)."""
    indices = list(range(start, len(view)))
    return torch.utils.data.DataLoader(torch.utils.data.Subset(view, indices), batch_size=cfg.batch_size,
                                       shuffle=False, drop_last=True, num_workers=cfg.workers,
                                       persistent_workers=False, worker_init_fn=ignore_terminate)


class DataFailed(TrainingError):
    """A training batch could not be made (an image that cannot be read or decoded)."""


def _batches(view: AugmentedView, cfg: TrainConfig, start: int, data: DeviceData | None):
    """The batches of `view` from sample `start`: decoded and augmented by workers, or on the
    device from the frames already there (`--data-on-device`), with the same random choices."""
    if data is None:
        return _loaded(_loader(view, cfg, start))
    return data.batches(view.indices[start:], view.aug, view.seed, view.epoch, cfg.batch_size)


def _loaded(loader: torch.utils.data.DataLoader):
    """`loader`'s batches; its failures as one-line `DataFailed`, and its workers ended whatever
    happens: they ignore SIGTERM (`ignore_terminate`), so a loader kept alive by an exception's
    traceback would leave Python's exit waiting for them for ever."""
    batches = iter(loader)
    try:
        yield from batches
    except BigsegError as e:  # from a worker it comes back as "Caught ... Original Traceback ..."
        raise DataFailed(_worker_message(e)) from None
    finally:
        shutdown = getattr(batches, "_shutdown_workers", None)  # absent without workers
        if shutdown is not None:
            shutdown()


def _data_failure(e: Exception) -> str | None:
    """What stopped the batches, in one line; None for any other error. A worker's death is raised
    by torch's SIGCHLD handler wherever the main process is, not only where it waits for a batch."""
    if isinstance(e, DataFailed):
        return str(e)
    if isinstance(e, RuntimeError) and not isinstance(e, BigsegError) and "DataLoader worker (pid" in str(e):
        return f"a data worker stopped: {str(e).strip().rstrip('.')} (out of memory? fewer --workers use less)"
    return None


def _worker_message(e: BigsegError) -> str:
    """The error's own message, without the traceback a DataLoader worker wraps it in."""
    text = str(e).strip()
    if "Original Traceback" not in text:
        return text
    return text.splitlines()[-1].split(": ", 1)[-1]


def train(cfg: TrainConfig, resume: bool = False,
          on_event: Callable[[str, dict], None] = lambda kind, info: None) -> TrainResult:
    """Train `cfg.arch` on `cfg.data`; resumable from `run_dir/last.pt` with `resume=True`."""
    run_dir = Path(cfg.run_dir)
    device = resolve_device(cfg.device)
    dtype = resolve_precision(cfg.precision, device)
    threads = set_threads(cfg.threads)
    d = D.rank_from_env()
    D.init(d, "nccl" if device.type == "cuda" else "gloo")
    if d.active and device.type == "cuda":
        device = torch.device("cuda", d.local_rank)
        torch.cuda.set_device(device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # every step of a phase has the same crop: autotune once
    torch.manual_seed(cfg.seed)

    if cfg.class_balance not in BALANCING:
        raise TrainingError(f"class balance must be one of {', '.join(BALANCING)}, got {cfg.class_balance!r}")
    if not 0 <= cfg.lovasz <= 10:
        raise TrainingError(f"--lovasz is a loss weight from 0 to 10, got {cfg.lovasz}")
    if cfg.teacher and not 0 < cfg.distil <= 10:
        raise TrainingError(f"--distil is a loss weight above 0 and at most 10, got {cfg.distil}")
    if cfg.teacher and cfg.data_on_device:
        raise TrainingError("--teacher reads the teacher's targets from the run folder in the data workers; "
                            "it does not combine with --data-on-device")

    # --- data --------------------------------------------------------------------------------
    for name, value in (("--jitter", cfg.jitter), ("--colour-jitter", cfg.colour_jitter), ("--gamma", cfg.gamma)):
        if not 0 <= value < 1:
            raise TrainingError(f"{name} must be at least 0 and below 1, got {value}")
    for name, scales in (("validation", cfg.val_scales), ("teacher", cfg.teacher_scales if cfg.teacher else (1.0,))):
        if not scales or any(not 0.1 <= s <= 4 for s in scales):
            raise TrainingError(f"{name} scales must be factors between 0.1 and 4, got {scales}")
    train_set = open_dataset(cfg.data, cfg.train_split)
    val_set = open_dataset(cfg.data, cfg.val_split) if cfg.eval_every > 0 else None
    if val_set is not None and {s.image for s in train_set.samples} & {s.image for s in val_set.samples}:
        raise TrainingError(f"--val-split {cfg.val_split} overlaps --train-split {cfg.train_split}: its mIoU would "
                            f"select on training images; use --eval-every 0 (the last epoch is the model) "
                            f"or another --val-split")
    classes, palette = list(train_set.classes), train_set.palette
    steps_per_epoch = len(train_set) // (cfg.batch_size * d.world)
    if steps_per_epoch == 0:
        raise TrainingError(f"{len(train_set)} training images are fewer than one batch of "
                            f"{cfg.batch_size} x {d.world} process(es); lower --batch-size")
    total_steps = steps_per_epoch * cfg.epochs
    device_data = DeviceData(train_set, device) if cfg.data_on_device else None
    targets = None
    if cfg.teacher:
        try:
            targets = prepare_teacher(cfg.teacher, train_set, run_dir, device, cfg.teacher_scales, cfg.teacher_flip,
                                      cfg.val_tile, d, on_event, reduction=cfg.teacher_reduction)
        except KeyboardInterrupt:
            stop_handled()
            raise Interrupted(f"interrupted while computing the teacher's targets: those done are kept in "
                              f"{run_dir / 'teacher'}; run the same command again to continue") from None

    # --- model and optimisation ----------------------------------------------------------------
    net = create_model(cfg.arch, len(classes), 3, **cfg.arch_config)
    check_crops(cfg, getattr(net, "output_multiple", 1))
    pretrained: set[str] = set()
    if cfg.backbone_weights:
        pretrained = set(load_backbone_weights(net, cfg.backbone_weights))
    prepared: dict = {}
    if not resume:
        prepared = net.prepare_training(train_set, cfg.seed) if hasattr(net, "prepare_training") else {}
        if prepared:
            on_event("prepared", prepared)  # e.g. DUpsampling's W (a resume loads it with the weights)
        if cfg.init:
            _load_init(net, cfg, classes)
        weights = class_weights(*label_statistics(train_set), cfg.class_balance)
        if weights is not None:
            prepared = {**prepared, "class_weights": weights}
    checkpointing = cfg.grad_checkpoint if cfg.grad_checkpoint is not None else device.type == "cuda"
    if checkpointing:
        set_grad_checkpointing(net, True)
    if cfg.sync_bn and d.active:
        net = nn.SyncBatchNorm.convert_sync_batchnorm(net)
    layout = torch.channels_last if cfg.channels_last else torch.contiguous_format
    net.to(device, memory_format=layout)
    optimizer = _optimizer(cfg, net, pretrained)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _schedule(cfg, total_steps))
    scaler = torch.amp.GradScaler(device.type, enabled=dtype is torch.float16)
    norm = Normalization()
    mean = torch.tensor(norm.mean, device=device).view(1, -1, 1, 1)
    std = torch.tensor(norm.std, device=device).view(1, -1, 1, 1)

    epoch, step_in_epoch, global_step, best, history = 0, 0, 0, None, []
    last_path = run_dir / "last.pt"
    if resume:
        state = _load_run_state(last_path, cfg)
        net.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        torch.set_rng_state(state["rng"]["torch"])
        if "cuda" in state["rng"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["rng"]["cuda"])
        epoch, step_in_epoch, global_step = state["epoch"], state["step_in_epoch"], state["global_step"]
        best, history = state["best_miou"], list(state["history"])
        prepared = dict(state.get("prepared", {}))
        on_event("resume", {"epoch": epoch, "step": step_in_epoch, "global_step": global_step})
    weight = None if "class_weights" not in prepared else torch.tensor(prepared["class_weights"], device=device)
    model: nn.Module = net
    if d.active:
        model = nn.parallel.DistributedDataParallel(net, device_ids=[device.index] if device.type == "cuda" else None)
    if cfg.compile:
        model = torch.compile(model)

    def save_run() -> None:
        if d.main:
            _save_run(last_path, config=asdict(cfg), model=net.state_dict(),
                      optimizer=optimizer.state_dict(), scheduler=scheduler.state_dict(),
                      scaler=scaler.state_dict(), rng=_rng_state(), epoch=epoch,
                      step_in_epoch=step_in_epoch, global_step=global_step, best_miou=best,
                      history=history, prepared=prepared)

    def describe(metrics: dict | None = None) -> Checkpoint:
        return from_model(net, cfg.arch, classes, palette, norm, training={
            "data": str(cfg.data), "config": asdict(cfg), "epochs": epoch, "steps": global_step,
            "metrics": metrics or {}, **({"prepared": prepared} if prepared else {})})

    if d.main:
        run_dir.mkdir(parents=True, exist_ok=True)
    on_event("start", {"steps_per_epoch": steps_per_epoch, "total_steps": total_steps, "epoch": epoch,
                       "world": d.world, "train_images": len(train_set), "device": str(device),
                       "precision": str(dtype).removeprefix("torch."), "threads": threads,
                       "grad_checkpoint": checkpointing, "grad_checkpoint_auto": cfg.grad_checkpoint is None,
                       "channels_last": cfg.channels_last, "compile": cfg.compile,
                       "crops": sorted({crop_at(cfg, e) for e in range(cfg.epochs)}),
                       "data_on_device": None if device_data is None else device_data.nbytes,
                       "class_weights": prepared.get("class_weights")})
    losses: list[float] = []
    stopped = "finished"
    in_step = False
    try:
        while epoch < cfg.epochs:
            order = np.random.default_rng([cfg.seed, epoch]).permutation(len(train_set)).tolist()
            aug = _augmentation(cfg, epoch)
            view = AugmentedView(train_set, D.shard(order, d, cfg.batch_size), aug, cfg.seed, epoch, targets)
            net.train()
            t0, epoch_losses = time.perf_counter(), []
            for images, labels, *teacher in _batches(view, cfg, step_in_epoch * cfg.batch_size, device_data):
                check_stop()
                if cfg.max_steps is not None and global_step >= cfg.max_steps:
                    stopped = "max_steps"
                    break
                in_step = True
                with whole_step():  # a stop lands between steps: the resumed run is the same run
                    x = ((images.to(device, non_blocking=True) - mean) / std).contiguous(memory_format=layout)
                    y = labels.to(device, non_blocking=True)
                    with torch.autocast(device.type, dtype=dtype, enabled=dtype is not torch.float32):
                        logits, aux = model(x, return_aux=True)
                    loss, parts = model_loss(net, logits, aux, y, global_step / total_steps, cfg.aux_weight, weight,
                                             cfg.lovasz)
                    if teacher:
                        soft = teacher[0].to(device, non_blocking=True)
                        loss, parts = distil_loss(loss, parts, logits, soft, cfg.distil)
                    if D.any_rank(d, not torch.isfinite(loss).item(), device):
                        raise TrainingError(f"the loss is not finite at epoch {epoch + 1}, step {step_in_epoch + 1} "
                                            f"({loss.item()}); the last good run checkpoint is {last_path}; "
                                            f"lower --lr or use --precision fp32")
                    optimizer.zero_grad(set_to_none=True)
                    scaler.scale(loss).backward()
                    scaler.step(optimizer)
                    scaler.update()
                    scheduler.step()
                    global_step += 1
                    step_in_epoch += 1
                    losses.append(loss.item())
                    epoch_losses.append(loss.item())
                in_step = False
                on_event("step", {"epoch": epoch, "step": step_in_epoch, "global_step": global_step,
                                  "loss": loss.item(), **parts, "lr": scheduler.get_last_lr()[0],
                                  "images_per_s": len(epoch_losses) * cfg.batch_size * d.world
                                  / (time.perf_counter() - t0)})
            if stopped == "max_steps":
                break
            check_stop()
            epoch += 1
            step_in_epoch = 0
            record = {"epoch": epoch, "steps": global_step, "train_loss": float(np.mean(epoch_losses)) if epoch_losses else None,
                      "lr": scheduler.get_last_lr()[0], "seconds": round(time.perf_counter() - t0, 2),
                      "crop": aug.crop}
            if val_set is not None and (epoch % cfg.eval_every == 0 or epoch == cfg.epochs):
                if d.main:
                    record.update(_validate(describe(), val_set, cfg, device))
                    if best is None or record["val_miou"] > best:
                        best = record["val_miou"]
                        save_checkpoint(describe(record), run_dir / "best.pt")
                        record["best"] = True
                D.barrier(d)
            history.append(record)
            save_run()
            if d.main:
                _write_logs(run_dir, history)
            on_event("epoch", record)
    except KeyboardInterrupt:
        stop_handled()
        stopped = "interrupted"
    except Exception as e:
        failure = _data_failure(e)
        if failure is None:
            raise
        if not in_step:  # between two steps, as a stop keeps it
            save_run()
            kept = f"kept epoch {epoch + 1} step {step_in_epoch} ({global_step} steps) in {last_path}"
        elif last_path.is_file():  # a worker's death is raised wherever this process is: half a step is not kept
            kept = f"it came inside a step, so {last_path} keeps the run as it was saved before"
        else:
            raise TrainingError(f"{failure}; it came inside a step before the run was first saved: start it "
                                f"again") from None
        raise TrainingError(f"{failure}; {kept}; continue with `bigseg train --run {run_dir} --resume`") from None
    if stopped != "finished":
        save_run()
        if stopped != "interrupted":
            on_event("stopped", {"why": stopped, "epoch": epoch, "step": step_in_epoch, "global_step": global_step,
                                 "path": str(last_path)})
    elif d.main:
        metrics = history[-1] if history else {}
        if cfg.recompute_bn > 0:
            aug = _augmentation(cfg, cfg.epochs - 1)
            recompute_batchnorm(net, train_set, aug, cfg, device, mean, std, device_data)
            if val_set is not None:
                metrics = {**metrics, **_validate(describe(), val_set, cfg, device), "bn_recomputed": True}
                if best is None or metrics["val_miou"] > best:
                    best = metrics["val_miou"]
                    save_checkpoint(describe(metrics), run_dir / "best.pt")
        save_checkpoint(describe(metrics), run_dir / "final.pt")
        if val_set is None:
            save_checkpoint(describe(metrics), run_dir / "best.pt")
    D.barrier(d)
    D.shutdown(d)
    if stopped == "interrupted":
        raise Interrupted(f"interrupted: kept epoch {epoch + 1} step {step_in_epoch} ({global_step} steps) in "
                          f"{last_path}; continue with `bigseg train --run {run_dir} --resume`")
    return TrainResult(run_dir, epoch, global_step, best, losses, stopped)


def _validate(ckpt: Checkpoint, val_set, cfg: TrainConfig, device: torch.device) -> dict:
    # torch, not an exported engine: the weights change every epoch (an export each time would cost more)
    predictor = Predictor(ckpt, str(device), "fp32" if device.type == "cpu" else "auto", tile=cfg.val_tile,
                          scales=tuple(cfg.val_scales), engine="torch")
    result = evaluate(predictor, val_set, cfg.val_split)
    return {"val_miou": result.scores["miou"], "val_pixel_accuracy": result.scores["pixel_accuracy"]}


@torch.no_grad()
def recompute_batchnorm(model: nn.Module, train_set, aug: Augment, cfg: TrainConfig, device: torch.device,
                        mean: torch.Tensor, std: torch.Tensor, data: DeviceData | None = None) -> None:
    """Replace running statistics by exact averages over `cfg.recompute_bn` training batches."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative moving average = exact mean over the batches seen
    model.train()
    order = np.random.default_rng([cfg.seed, 10**6]).permutation(len(train_set)).tolist()
    view = AugmentedView(train_set, order, aug, cfg.seed, 10**6)
    for i, (images, _) in enumerate(_batches(view, cfg, 0, data)):
        if i >= cfg.recompute_bn:
            break
        model((images.to(device) - mean) / std)
    for m, momentum in zip(bns, saved):
        m.momentum = momentum
    model.eval()


def _write_logs(run_dir: Path, history: list[dict]) -> None:
    keys = sorted({k for r in history for k in r})
    lines = [",".join(keys)] + [",".join("" if r.get(k) is None else str(r.get(k)) for k in keys) for r in history]
    write_text(run_dir / "log.csv", "\n".join(lines) + "\n")
    write_text(run_dir / "log.json", json.dumps(history, indent=1))
    plot_curves(history, run_dir / "curves.png")
