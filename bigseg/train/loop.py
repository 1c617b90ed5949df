"""The training loop: `train` = setup (`bigseg.train.setup`: settings, data, model), then epochs of
steps, read top to bottom in `Run.epoch` and `Run.step`, and the end of the run (`Run.finish`).

A run folder holds: `last.pt` (the run checkpoint, `bigseg.train.state`: written atomically every
epoch and on Ctrl-C or SIGTERM), `best.pt` (the best model by validation mIoU, a self-describing
checkpoint `predict` loads), `final.pt`, `log.csv` / `log.json`, `curves.png` and `data.json`
(`bigseg.train.records`).
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from bigseg import distributed as D
from bigseg.checkpoint import Checkpoint, from_model, save_checkpoint
from bigseg.errors import Interrupted, TrainingError
from bigseg.io.gdal import gdal_env
from bigseg.models.blocks import set_grad_checkpointing
from bigseg.infer.predictor import Predictor
from bigseg.runtime import check_stop, stop_handled, whole_step
from bigseg.train.averaging import WeightAverage
from bigseg.train.batches import batches, data_failure
from bigseg.train.config import TrainConfig, crop_at
from bigseg.train.data import EpochView
from bigseg.train.device_data import DeviceData
from bigseg.train.evaluation import evaluate
from bigseg.train.losses import distil_loss, model_loss
from bigseg.train.records import write_data_description, write_logs
from bigseg.train.setup import (
    Environment,
    TrainingData,
    build_model,
    check_settings,
    environment,
    open_data,
    optimizer,
    prepare_targets,
    schedule,
)
from bigseg.train.state import Progress, load_run_config, load_run_state, restore, save_run
from bigseg.train.transforms import Augment

__all__ = ["TrainConfig", "TrainResult", "load_run_config", "recompute_batchnorm", "train"]


@dataclass
class TrainResult:
    run_dir: Path
    epochs_done: int
    steps_done: int
    best_miou: float | None
    losses: list[float]
    stopped: str  # "finished", "max_steps", "interrupted" or "already finished" (a resumed run that was)


def train(cfg: TrainConfig, resume: bool = False,
          on_event: Callable[[str, dict], None] = lambda kind, info: None) -> TrainResult:
    """Train `cfg.arch` on `cfg.data`; resumable from `run_dir/last.pt` with `resume=True`. GDAL's
    block cache is bounded as in predict (data workers inherit it), so memory does not grow with
    the size of the rasters read."""
    with gdal_env():
        run = start(cfg, resume, on_event)
        if run.at.epoch >= cfg.epochs:  # resumed after its last epoch: nothing to train, its files stay
            D.shutdown(run.env.rank)
            return TrainResult(run.run_dir, run.at.epoch, run.at.global_step, run.at.best, [], "already finished")
        stopped = "finished"
        try:
            while run.at.epoch < cfg.epochs and stopped == "finished":
                stopped = run.epoch()
        except KeyboardInterrupt:
            stop_handled()
            stopped = "interrupted"
        except Exception as e:
            run.data_failed(e)
        return run.finish(stopped)


def start(cfg: TrainConfig, resume: bool, on_event: Callable[[str, dict], None]) -> "Run":
    """Everything before the first step: settings checked, the data, the model (a new one, or the
    stopped run's), its optimisation."""
    check_settings(cfg)
    env = environment(cfg)
    state = load_run_state(Path(cfg.run_dir) / "last.pt", cfg) if resume else None
    data = open_data(cfg, env.rank.world)
    for note in data.notes:
        on_event("note", {"text": note})
    torch.manual_seed(cfg.seed)
    data.targets = prepare_targets(cfg, data, Path(cfg.run_dir), env.device, env.rank, on_event)
    data.device_data = DeviceData(data.train, env.device) if cfg.data_on_device else None
    net, pretrained = build_model(cfg, data, new=state is None)
    if data.prepared.get("dupsampling_patches"):
        on_event("prepared", {k: v for k, v in data.prepared.items() if k.startswith("dupsampling")})
    checkpointing = cfg.grad_checkpoint if cfg.grad_checkpoint is not None else env.device.type == "cuda"
    if checkpointing:
        set_grad_checkpointing(net, True)
    if cfg.sync_bn and env.rank.active:
        net = nn.SyncBatchNorm.convert_sync_batchnorm(net)
    net.to(env.device, memory_format=torch.channels_last if cfg.channels_last else torch.contiguous_format)
    opt = optimizer(cfg, net, pretrained)
    scheduler = torch.optim.lr_scheduler.LambdaLR(opt, schedule(cfg, data.steps_per_epoch * cfg.epochs))
    scaler = torch.amp.GradScaler(env.device.type, enabled=env.dtype is torch.float16)
    average = WeightAverage(net, cfg.ema)
    at = Progress()
    if state is not None:
        at = restore(state, net, opt, scheduler, scaler, average)
        data.prepared = dict(state.get("prepared", {}))
        on_event("resume", {"epoch": at.epoch, "step": at.step_in_epoch, "global_step": at.global_step,
                            "finished": at.epoch >= cfg.epochs, "epochs": cfg.epochs})
    run = Run(cfg, env, data, net, opt, scheduler, scaler, average, at, on_event)
    run.begin(checkpointing)
    return run


class Run:
    """A training run under way: its settings, data, model and optimisation, and where it is."""

    def __init__(self, cfg: TrainConfig, env: Environment, data: TrainingData, net: nn.Module, opt, scheduler,
                 scaler, average: WeightAverage, at: Progress, on_event: Callable[[str, dict], None]):
        self.cfg, self.env, self.data, self.net, self.at, self.on_event = cfg, env, data, net, at, on_event
        self.opt, self.scheduler, self.scaler, self.average = opt, scheduler, scaler, average
        self.run_dir = Path(cfg.run_dir)
        self.last_path = self.run_dir / "last.pt"
        self.total_steps = data.steps_per_epoch * cfg.epochs
        self.layout = torch.channels_last if cfg.channels_last else torch.contiguous_format
        norm = data.normalization
        self.mean = torch.tensor(norm.mean, device=env.device).view(1, -1, 1, 1)
        self.std = torch.tensor(norm.std, device=env.device).view(1, -1, 1, 1)
        weights = data.prepared.get("class_weights")
        self.weight = None if weights is None else torch.tensor(weights, device=env.device)
        self.model: nn.Module = net
        if env.rank.active:
            self.model = nn.parallel.DistributedDataParallel(
                net, device_ids=[env.device.index] if env.device.type == "cuda" else None)
        if cfg.compile:
            self.model = torch.compile(self.model)
        self.losses: list[float] = []
        self.in_step = False
        self.epoch_start: float | None = None  # perf_counter at the start of this process's part of the epoch

    def begin(self, checkpointing: bool) -> None:
        """The run folder, data.json, and the "start" event that says how the run will go."""
        cfg, env, data = self.cfg, self.env, self.data
        if env.rank.main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            write_data_description(self.run_dir, data.train, data.val, data.notes, data.input, data.prepared)
        self.on_event("start", {
            "steps_per_epoch": data.steps_per_epoch, "total_steps": self.total_steps, "epoch": self.at.epoch,
            "world": env.rank.world, "train_images": len(data.sampler),
            "unit": data.source.unit, "device": str(env.device),
            "precision": str(env.dtype).removeprefix("torch."), "threads": env.threads,
            "grad_checkpoint": checkpointing, "grad_checkpoint_auto": cfg.grad_checkpoint is None,
            "channels_last": cfg.channels_last, "compile": cfg.compile,
            "crops": sorted({crop_at(cfg, e) for e in range(cfg.epochs)}),
            "data_on_device": None if data.device_data is None else data.device_data.nbytes,
            "class_weights": data.prepared.get("class_weights")})

    # --- one epoch, one step -------------------------------------------------------------------

    def epoch(self) -> str:
        """The steps of the current epoch (from where a resumed run stopped), then its record, a
        validation when due, and a run checkpoint. Returns "max_steps" when that stops the run."""
        cfg, at, d = self.cfg, self.at, self.env.rank
        aug = augmentation(cfg, at.epoch)
        keys = D.shard(self.data.sampler.epoch(cfg.seed, at.epoch), d, cfg.batch_size)
        view = EpochView(self.data.source, self.data.sampler, keys, aug, cfg.seed, at.epoch, self.data.targets)
        self.net.train()
        if cfg.freeze_bn:
            freeze_batchnorm(self.net)
        self.epoch_start, done_before = time.perf_counter(), len(at.epoch_losses)  # a resumed epoch goes on
        for images, labels, *teacher in batches(view, cfg, at.step_in_epoch * cfg.batch_size, self.data.device_data):
            check_stop()
            if cfg.max_steps is not None and at.global_step >= cfg.max_steps:
                return "max_steps"
            loss, parts = self.step(images, labels, teacher[0] if teacher else None)
            at.epoch_losses.append(loss)
            self.on_event("step", {"epoch": at.epoch, "step": at.step_in_epoch, "global_step": at.global_step,
                                   "loss": loss, **parts, "lr": self.scheduler.get_last_lr()[0],
                                   "images_per_s": (len(at.epoch_losses) - done_before) * cfg.batch_size * d.world
                                   / (time.perf_counter() - self.epoch_start)})
        check_stop()
        at.epoch += 1
        at.step_in_epoch = 0
        record = {"epoch": at.epoch, "steps": at.global_step,
                  "train_loss": float(np.mean(at.epoch_losses)) if at.epoch_losses else None,
                  "lr": self.scheduler.get_last_lr()[0], "seconds": round(self.seconds_in_epoch(), 2), "crop": aug.crop}
        at.epoch_losses, at.epoch_seconds, self.epoch_start = [], 0.0, None
        if self.data.val is not None and (at.epoch % cfg.eval_every == 0 or at.epoch == cfg.epochs):
            if d.main:
                record.update(self.validate())
                if self.keep_if_best(record):
                    record["best"] = True
            D.barrier(d)
        at.history.append(record)
        self.save()
        if d.main:
            write_logs(self.run_dir, at.history)
        self.on_event("epoch", record)
        return "finished"

    def step(self, images: torch.Tensor, labels: torch.Tensor, teacher: torch.Tensor | None
             ) -> tuple[float, dict[str, Any]]:
        """One optimisation step on a batch; a stop that arrives meanwhile lands after it."""
        cfg, at, device, dtype = self.cfg, self.at, self.env.device, self.env.dtype
        self.in_step = True
        with whole_step():  # a stop lands between steps: the resumed run is the same run
            x = ((images.to(device, non_blocking=True) - self.mean) / self.std).contiguous(memory_format=self.layout)
            y = labels.to(device, non_blocking=True)
            with torch.autocast(device.type, dtype=dtype, enabled=dtype is not torch.float32):
                logits, aux = self.model(x, return_aux=True)
            loss, parts = model_loss(self.net, logits, aux, y, at.global_step / self.total_steps, cfg.aux_weight,
                                     self.weight, cfg.lovasz)
            if teacher is not None:
                loss, parts = distil_loss(loss, parts, logits, teacher.to(device, non_blocking=True), cfg.distil)
            if D.any_rank(self.env.rank, not torch.isfinite(loss).item(), device):
                raise TrainingError(f"the loss is not finite at epoch {at.epoch + 1}, step {at.step_in_epoch + 1} "
                                    f"({loss.item()}); the last good run checkpoint is {self.last_path}; "
                                    f"lower --lr or use --precision fp32")
            self.opt.zero_grad(set_to_none=True)
            self.scaler.scale(loss).backward()
            self.scaler.step(self.opt)
            self.scaler.update()
            self.scheduler.step()
            self.average.update()
            at.global_step += 1
            at.step_in_epoch += 1
            self.losses.append(loss.item())
        self.in_step = False
        return loss.item(), parts

    # --- models and checkpoints ----------------------------------------------------------------

    def describe(self, metrics: dict | None = None) -> Checkpoint:
        """The model (the weight average with `--ema`) as a self-describing checkpoint (what predict loads)."""
        cfg, data = self.cfg, self.data
        return from_model(self.average.model, cfg.arch, data.train.classes, data.train.palette, data.normalization, training={
            "data": str(cfg.data), "config": asdict(cfg), "epochs": self.at.epoch, "steps": self.at.global_step,
            "metrics": metrics or {}, **({"prepared": data.prepared} if data.prepared else {})}, input=data.input)

    def validate(self) -> dict:
        """mIoU on the validation split, through the tiled predictor at the validation scales (torch,
        not an exported engine: the weights change every epoch)."""
        device = self.env.device
        predictor = Predictor(self.describe(), str(device), "fp32" if device.type == "cpu" else "auto",
                              tile=self.cfg.val_tile, scales=tuple(self.cfg.val_scales), engine="torch")
        result = evaluate(predictor, self.data.val)
        return {"val_miou": result.scores["miou"], "val_pixel_accuracy": result.scores["pixel_accuracy"],
                "val_iou": result.scores["iou"]}

    def keep_if_best(self, metrics: dict) -> bool:
        if self.at.best is not None and metrics["val_miou"] <= self.at.best:
            return False
        self.at.best = metrics["val_miou"]
        save_checkpoint(self.describe(metrics), self.run_dir / "best.pt")
        return True

    def seconds_in_epoch(self) -> float:
        """The epoch's training time so far, the parts before a resume included."""
        ongoing = 0.0 if self.epoch_start is None else time.perf_counter() - self.epoch_start
        return self.at.epoch_seconds + ongoing

    def save(self) -> None:
        if self.epoch_start is not None:  # a stop inside an epoch keeps its time so far
            self.at.epoch_seconds, self.epoch_start = self.seconds_in_epoch(), time.perf_counter()
        if self.env.rank.main:
            described = {k: v for k, v in self.describe().to_dict().items() if k not in ("state_dict", "training")}
            save_run(self.last_path, self.cfg, self.at, self.net, self.opt, self.scheduler, self.scaler,
                     self.average, self.data.prepared, described)

    # --- the end -------------------------------------------------------------------------------

    def data_failed(self, e: Exception) -> None:
        """A data worker's failure as one error that says what was kept; any other error as it is."""
        failure = data_failure(e)
        if failure is None:
            raise e
        at = self.at
        if not self.in_step:  # between two steps, as a stop keeps it
            self.save()
            kept = f"kept epoch {at.epoch + 1} step {at.step_in_epoch} ({at.global_step} steps) in {self.last_path}"
        elif self.last_path.is_file():  # a worker's death is raised wherever this process is: half a step is not kept
            kept = f"it came inside a step, so {self.last_path} keeps the run as it was saved before"
        else:
            raise TrainingError(f"{failure}; it came inside a step before the run was first saved: start it "
                                f"again") from None
        raise TrainingError(f"{failure}; {kept}; continue with `bigseg train --run {self.run_dir} --resume`") from None

    def finish(self, stopped: str) -> TrainResult:
        """A stopped run keeps its run checkpoint; a finished one writes its models (after exact
        batchnorm statistics with `--recompute-bn`)."""
        cfg, at, d = self.cfg, self.at, self.env.rank
        if stopped != "finished":
            self.save()
            if stopped != "interrupted":
                self.on_event("stopped", {"why": stopped, "epoch": at.epoch, "step": at.step_in_epoch,
                                          "global_step": at.global_step, "path": str(self.last_path)})
        elif d.main:
            metrics = at.history[-1] if at.history else {}
            if cfg.recompute_bn > 0:
                recompute_batchnorm(self.average.model, self.data, augmentation(cfg, cfg.epochs - 1), cfg, self.env.device,
                                    self.mean, self.std)
                if self.data.val is not None:
                    metrics = {**metrics, **self.validate(), "bn_recomputed": True}
                    self.keep_if_best(metrics)
            save_checkpoint(self.describe(metrics), self.run_dir / "final.pt")
            if self.data.val is None:
                save_checkpoint(self.describe(metrics), self.run_dir / "best.pt")
        D.barrier(d)
        D.shutdown(d)
        if stopped == "interrupted":
            raise Interrupted(f"interrupted: kept epoch {at.epoch + 1} step {at.step_in_epoch} ({at.global_step} "
                              f"steps) in {self.last_path}; continue with `bigseg train --run {self.run_dir} --resume`")
        return TrainResult(self.run_dir, at.epoch, at.global_step, at.best, self.losses, stopped)


def augmentation(cfg: TrainConfig, epoch: int) -> Augment:
    """The augmentation of `epoch` (0-based): its crop under the crop schedule, the run's ranges."""
    return Augment(crop_at(cfg, epoch), cfg.scale_min, cfg.scale_max, cfg.flip, cfg.jitter, cfg.colour_jitter,
                   cfg.gamma, cfg.rotate)


def batchnorm_layers(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def freeze_batchnorm(model: nn.Module) -> None:
    """Batchnorm layers normalise with their running statistics and keep them (`--freeze-bn`); their
    scale and shift still learn. A fine-tune on small batches drawn from scenes unlike the ones
    the model will see then cannot move the statistics the model was selected with."""
    for m in batchnorm_layers(model):
        m.eval()


@torch.no_grad()
def recompute_batchnorm(model: nn.Module, data: TrainingData, aug: Augment, cfg: TrainConfig, device: torch.device,
                        mean: torch.Tensor, std: torch.Tensor) -> None:
    """Replace running statistics by exact averages over `cfg.recompute_bn` training batches."""
    bns = batchnorm_layers(model)
    saved = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative moving average = exact mean over the batches seen
    model.train()
    epoch = 10**6  # a draw of its own, unlike any training epoch's
    view = EpochView(data.source, data.sampler, data.sampler.epoch(cfg.seed, epoch), aug, cfg.seed, epoch)
    for i, (images, _) in enumerate(batches(view, cfg, 0, data.device_data)):
        if i >= cfg.recompute_bn:
            break
        model((images.to(device) - mean) / std)
    for m, momentum in zip(bns, saved):
        m.momentum = momentum
    model.eval()
