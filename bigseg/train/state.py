"""The run checkpoint (`last.pt`): everything a stopped run needs to go on as if it had not
stopped (model, optimiser, schedule, scaler, RNG states, where it was, what was computed from the
data), written atomically; and the settings a resumed run may change."""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from bigseg.atomic import atomic_path
from bigseg.checkpoint import RUN_FORMAT
from bigseg.errors import TrainingError
from bigseg.train.config import DEFAULTS, RESUMABLE, TrainConfig


@dataclass
class Progress:
    """Where the run is: epochs and steps done, the best validation mIoU, the per-epoch records."""

    epoch: int = 0
    step_in_epoch: int = 0
    global_step: int = 0
    best: float | None = None
    history: list[dict] = field(default_factory=list)
    epoch_losses: list[float] = field(default_factory=list)  # the epoch under way: its steps' losses so far
    epoch_seconds: float = 0.0                              # and its seconds before the last stop


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


def load_run_state(path: Path, cfg: TrainConfig) -> dict[str, Any]:
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


def save_run(path: Path, cfg: TrainConfig, at: Progress, net, optimizer, scheduler, scaler, average,
             prepared: dict, described: dict) -> None:
    """Write the run checkpoint atomically; `described`: the model's checkpoint fields but its
    weights (so `predict --model last.pt` works)."""
    state = {"format": RUN_FORMAT, "config": asdict(cfg), "model": net.state_dict(), "checkpoint": described,
             "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(),
             "rng": _rng_state(), "epoch": at.epoch, "step_in_epoch": at.step_in_epoch,
             "global_step": at.global_step, "best_miou": at.best, "history": at.history, "prepared": prepared,
             "epoch_losses": list(at.epoch_losses), "epoch_seconds": at.epoch_seconds}
    if average.state_dict() is not None:
        state["average"] = average.state_dict()
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def restore(state: dict[str, Any], net, optimizer, scheduler, scaler, average) -> Progress:
    """Load a run checkpoint into the run's objects and RNG; returns where the run was."""
    net.load_state_dict(state["model"])
    average.load_state_dict(state.get("average"))
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    scaler.load_state_dict(state["scaler"])
    torch.set_rng_state(state["rng"]["torch"])
    if "cuda" in state["rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["rng"]["cuda"])
    return Progress(state["epoch"], state["step_in_epoch"], state["global_step"], state["best_miou"],
                    list(state["history"]), list(state.get("epoch_losses", [])), float(state.get("epoch_seconds", 0.0)))


def _rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state
