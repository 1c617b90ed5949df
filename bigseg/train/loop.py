"""The training loop, top to bottom in one function (`train`), plus its run-checkpoint state.

A run folder holds: `last.pt` (run checkpoint: model, optimizer, scheduler, scaler, RNG states,
epoch and step, written atomically every epoch and on Ctrl-C), `best.pt` (the best model by
validation mIoU, a self-describing checkpoint `predict` loads), `log.csv`/`log.json` (per-epoch
metrics) and `curves.png`.
"""
from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from bigseg.checkpoint import Checkpoint, Normalization, from_model, load_backbone_weights, save_checkpoint
from bigseg.device import resolve_device, resolve_precision
from bigseg.errors import TrainingError
from bigseg.models import create_model
from bigseg.models.blocks import set_grad_checkpointing
from bigseg.train import distributed as D
from bigseg.train.datasets import open_dataset
from bigseg.train.losses import model_loss
from bigseg.train.transforms import Augment, AugmentedView

RUN_FORMAT = "bigseg-run"


@dataclass(frozen=True)
class TrainConfig:
    data: str
    run_dir: str
    arch: str = "ladder-dn121"
    arch_config: dict = field(default_factory=dict)
    epochs: int = 100
    batch_size: int = 8
    crop: int = 448
    scale_min: float = 0.5
    scale_max: float = 2.0
    flip: bool = True
    jitter: float = 0.0
    optimizer: str = "adam"        # adam | sgd
    lr: float = 4e-4
    weight_decay: float = 1e-4
    schedule: str = "cosine"       # cosine | poly
    min_lr: float = 1e-6
    pretrained_lr_factor: float = 0.25  # backbone weights loaded from ImageNet: lr / 4 (and wd / 4)
    backbone_weights: str | None = None
    grad_checkpoint: bool = True
    aux_weight: float = 0.4
    device: str = "auto"
    precision: str = "auto"
    workers: int = 2
    seed: int = 0
    eval_every: int = 1
    val_split: str = "val"
    val_tile: int = 1024
    sync_bn: bool = False
    recompute_bn: int = 0          # batches for exact BN statistics after training (0: off)
    max_steps: int | None = None   # stop (with a run checkpoint) after this many steps in all


@dataclass
class TrainResult:
    run_dir: Path
    epochs_done: int
    steps_done: int
    best_miou: float | None
    losses: list[float]
    stopped: str  # "finished", "max_steps" or "interrupted"


RESUMABLE = ("epochs", "max_steps", "workers", "device")  # settings a resumed run may change


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
        raise TrainingError(f"--{bad[0].replace('_', '-')} cannot change when resuming "
                            f"(the run uses {config.get(bad[0])!r}); start a new --run instead")
    return TrainConfig(**{**config, **changes})


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
    tmp = path.with_name(f".{path.name}.partial")
    torch.save({"format": RUN_FORMAT, **state}, tmp)
    os.replace(tmp, path)


def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def _loader(view: AugmentedView, cfg: TrainConfig, start: int) -> torch.utils.data.DataLoader:
    """Batches of `view` in order from sample `start` (a resumed epoch skips what it has done)."""
    indices = list(range(start, len(view)))
    return torch.utils.data.DataLoader(torch.utils.data.Subset(view, indices), batch_size=cfg.batch_size,
                                       shuffle=False, drop_last=True, num_workers=cfg.workers,
                                       persistent_workers=False)


def train(cfg: TrainConfig, resume: bool = False,
          on_event: Callable[[str, dict], None] = lambda kind, info: None) -> TrainResult:
    """Train `cfg.arch` on `cfg.data`; resumable from `run_dir/last.pt` with `resume=True`."""
    run_dir = Path(cfg.run_dir)
    device = resolve_device(cfg.device)
    dtype = resolve_precision(cfg.precision, device)
    d = D.init_from_env(device)
    if d.active and device.type == "cuda":
        device = torch.device("cuda", d.local_rank)
        torch.cuda.set_device(device)
    torch.manual_seed(cfg.seed)

    # --- data --------------------------------------------------------------------------------
    train_set = open_dataset(cfg.data, "train")
    val_set = open_dataset(cfg.data, cfg.val_split) if cfg.eval_every > 0 else None
    classes, palette = list(train_set.classes), train_set.palette
    aug = Augment(cfg.crop, cfg.scale_min, cfg.scale_max, cfg.flip, cfg.jitter)
    steps_per_epoch = len(train_set) // (cfg.batch_size * d.world)
    if steps_per_epoch == 0:
        raise TrainingError(f"{len(train_set)} training images are fewer than one batch of "
                            f"{cfg.batch_size} x {d.world} process(es); lower --batch-size")
    total_steps = steps_per_epoch * cfg.epochs

    # --- model and optimisation ----------------------------------------------------------------
    model = create_model(cfg.arch, len(classes), 3, **cfg.arch_config)
    pretrained: set[str] = set()
    if cfg.backbone_weights:
        pretrained = set(load_backbone_weights(model, cfg.backbone_weights))
    prepared: dict = {}
    if not resume and hasattr(model, "prepare_training"):
        prepared = model.prepare_training(train_set, cfg.seed)  # e.g. DUpsampling's W (resume loads it)
        if prepared:
            on_event("prepared", prepared)
    if cfg.grad_checkpoint:
        set_grad_checkpointing(model, True)
    if cfg.sync_bn and d.active:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    model.to(device)
    optimizer = _optimizer(cfg, model, pretrained)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _schedule(cfg, total_steps))
    scaler = torch.amp.GradScaler(device.type, enabled=dtype is torch.float16)
    norm = Normalization()
    mean = torch.tensor(norm.mean, device=device).view(1, -1, 1, 1)
    std = torch.tensor(norm.std, device=device).view(1, -1, 1, 1)

    epoch, step_in_epoch, global_step, best, history = 0, 0, 0, None, []
    last_path = run_dir / "last.pt"
    if resume:
        if not last_path.is_file():
            raise TrainingError(f"nothing to resume: {last_path} does not exist")
        state = torch.load(last_path, map_location="cpu", weights_only=True)
        if state.get("format") != RUN_FORMAT:
            raise TrainingError(f"{last_path} is not a bigseg run checkpoint")
        saved = {k: v for k, v in state["config"].items() if k not in RESUMABLE}
        mine = {k: v for k, v in asdict(cfg).items() if k in saved}
        changed = sorted(k for k in saved if json.dumps(saved[k]) != json.dumps(mine[k]))
        if changed:
            raise TrainingError(f"cannot resume with different settings: {', '.join(changed)}")
        _unwrap(model).load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        torch.set_rng_state(state["rng"]["torch"])
        if "cuda" in state["rng"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["rng"]["cuda"])
        epoch, step_in_epoch, global_step = state["epoch"], state["step_in_epoch"], state["global_step"]
        best, history = state["best_miou"], list(state["history"])
        prepared = dict(state.get("prepared", {}))
    if d.active:
        model = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)

    def save_run() -> None:
        if d.main:
            _save_run(last_path, config=asdict(cfg), model=_unwrap(model).state_dict(),
                      optimizer=optimizer.state_dict(), scheduler=scheduler.state_dict(),
                      scaler=scaler.state_dict(), rng=_rng_state(), epoch=epoch,
                      step_in_epoch=step_in_epoch, global_step=global_step, best_miou=best,
                      history=history, prepared=prepared)

    def describe(net: nn.Module, metrics: dict | None = None) -> Checkpoint:
        return from_model(net, cfg.arch, classes, palette, norm, training={
            "data": str(cfg.data), "config": asdict(cfg), "epochs": epoch, "steps": global_step,
            "metrics": metrics or {}, **({"prepared": prepared} if prepared else {})})

    if d.main:
        run_dir.mkdir(parents=True, exist_ok=True)
    on_event("start", {"steps_per_epoch": steps_per_epoch, "total_steps": total_steps, "epoch": epoch,
                       "world": d.world, "train_images": len(train_set)})
    losses: list[float] = []
    stopped = "finished"
    try:
        while epoch < cfg.epochs:
            order = np.random.default_rng([cfg.seed, epoch]).permutation(len(train_set)).tolist()
            view = AugmentedView(train_set, D.shard(order, d, cfg.batch_size), aug, cfg.seed, epoch)
            model.train()
            t0, epoch_losses = time.perf_counter(), []
            for images, labels in _loader(view, cfg, step_in_epoch * cfg.batch_size):
                if cfg.max_steps is not None and global_step >= cfg.max_steps:
                    stopped = "max_steps"
                    break
                x = (images.to(device, non_blocking=True) - mean) / std
                y = labels.to(device, non_blocking=True)
                with torch.autocast(device.type, dtype=dtype, enabled=dtype is not torch.float32):
                    logits, aux = model(x, return_aux=True)
                loss, parts = model_loss(_unwrap(model), logits, aux, y, global_step / total_steps, cfg.aux_weight)
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
                on_event("step", {"epoch": epoch, "step": step_in_epoch, "global_step": global_step,
                                  "loss": loss.item(), **parts, "lr": scheduler.get_last_lr()[0],
                                  "images_per_s": len(epoch_losses) * cfg.batch_size * d.world
                                  / (time.perf_counter() - t0)})
            if stopped == "max_steps":
                break
            epoch += 1
            step_in_epoch = 0
            record = {"epoch": epoch, "steps": global_step, "train_loss": float(np.mean(epoch_losses)) if epoch_losses else None,
                      "lr": scheduler.get_last_lr()[0], "seconds": round(time.perf_counter() - t0, 2)}
            if val_set is not None and (epoch % cfg.eval_every == 0 or epoch == cfg.epochs):
                if d.main:
                    record.update(_validate(describe(_unwrap(model)), val_set, cfg, device))
                    if best is None or record["val_miou"] > best:
                        best = record["val_miou"]
                        save_checkpoint(describe(_unwrap(model), record), run_dir / "best.pt")
                        record["best"] = True
                D.barrier(d)
            history.append(record)
            save_run()
            if d.main:
                _write_logs(run_dir, history)
            on_event("epoch", record)
    except KeyboardInterrupt:
        stopped = "interrupted"
    if stopped != "finished":
        save_run()
        on_event("stopped", {"why": stopped, "epoch": epoch, "step": step_in_epoch})
    elif d.main:
        final = _unwrap(model)
        metrics = history[-1] if history else {}
        if cfg.recompute_bn > 0:
            recompute_batchnorm(final, train_set, aug, cfg, device, mean, std)
            if val_set is not None:
                metrics = {**metrics, **_validate(describe(final), val_set, cfg, device), "bn_recomputed": True}
                if best is None or metrics["val_miou"] > best:
                    best = metrics["val_miou"]
                    save_checkpoint(describe(final, metrics), run_dir / "best.pt")
        save_checkpoint(describe(final, metrics), run_dir / "final.pt")
        if val_set is None:
            save_checkpoint(describe(final, metrics), run_dir / "best.pt")
    D.barrier(d)
    D.shutdown(d)
    if stopped == "interrupted":
        raise KeyboardInterrupt
    return TrainResult(run_dir, epoch, global_step, best, losses, stopped)


def _validate(ckpt: Checkpoint, val_set, cfg: TrainConfig, device: torch.device) -> dict:
    from bigseg.evaluation import evaluate
    from bigseg.inference import Segmenter

    seg = Segmenter(ckpt, str(device), "fp32" if device.type == "cpu" else "auto", tile=cfg.val_tile)
    result = evaluate(seg, val_set, cfg.val_split)
    return {"val_miou": result.scores["miou"], "val_pixel_accuracy": result.scores["pixel_accuracy"]}


@torch.no_grad()
def recompute_batchnorm(model: nn.Module, train_set, aug: Augment, cfg: TrainConfig, device: torch.device,
                        mean: torch.Tensor, std: torch.Tensor) -> None:
    """Replace running statistics by exact averages over `cfg.recompute_bn` training batches."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative moving average = exact mean over the batches seen
    model.train()
    order = np.random.default_rng([cfg.seed, 10**6]).permutation(len(train_set)).tolist()
    view = AugmentedView(train_set, order, aug, cfg.seed, 10**6)
    for i, (images, _) in enumerate(_loader(view, cfg, 0)):
        if i >= cfg.recompute_bn:
            break
        model((images.to(device) - mean) / std)
    for m, momentum in zip(bns, saved):
        m.momentum = momentum
    model.eval()


def _write_logs(run_dir: Path, history: list[dict]) -> None:
    from bigseg.train.plot import plot_curves

    keys = sorted({k for r in history for k in r})
    lines = [",".join(keys)] + [",".join("" if r.get(k) is None else str(r.get(k)) for k in keys) for r in history]
    for name, text in (("log.csv", "\n".join(lines) + "\n"), ("log.json", json.dumps(history, indent=1))):
        tmp = run_dir / f".{name}.partial"
        tmp.write_text(text)
        os.replace(tmp, run_dir / name)
    plot_curves(history, run_dir / "curves.png")
