"""The one decision of device, precision and engine for inference, made without torch from facts
the caller passes (is CUDA there, does it do bf16, which runtimes are installed), with the timing
cache that `auto` reads: which engine ran a tile shape fastest on this machine.

- Device: `auto` picks CUDA when present; CUDA asked for without it is an error, not a fallback.
- Precision: `auto` is bf16 on GPUs that support it and, for inference, on CPUs with bf16 units
  (`bigseg.infer.cache.native_bf16`); fp32 elsewhere. `$BIGSEG_PRECISION` replaces `auto`.
- Engine: torch on a GPU; on the CPU `auto` takes whichever of the installed exported runtimes and
  torch runs the tile shape fastest here, timed once per shape and machine (`engines.exported`).
- Warm start: a plain CPU run of a model whose card and exports are cached starts without torch
  (`warm_start`), unless torch is so much faster per tile that it gains back its start-up.
"""
from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bigseg.errors import InputError
from bigseg.infer.cache import default_threads, native_bf16
from bigseg.infer.card import ModelCard, model_file, read_card
from bigseg.infer.engines.base import RUNTIMES, label
from bigseg.infer.settings import Settings, default_precision

# Larger images go to torch's stitching (torch imported then); up to this size the numpy path was as
# fast or faster where measured (docs/engines.md, the warm start).
MAX_PIXELS = 17_000_000
# Importing torch takes about this long (docs/engines.md, the warm start): below it, an exported
# runtime a little slower than torch per tile still gives the faster command.
TORCH_START_S = 1.3
# auto: torch seconds on a shape before exporting it (about one export's cost; the ski-rental rule)
AUTO_EXPORT_AFTER_S = 30.0
TORCH_DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


@dataclass(frozen=True)
class Cuda:
    """What torch says of CUDA here (`available`, `count`, `bf16`: is_bf16_supported)."""

    available: bool
    count: int = 0
    bf16: bool = False


def choose_device(name: str, cuda: Cuda) -> str:
    """"cpu" or "cuda[:N]" for `--device`."""
    if name == "auto":
        return "cuda" if cuda.available else "cpu"
    found = re.fullmatch(r"(cpu|cuda)(?::(\d+))?", name)
    if found is None:
        raise InputError(f"unknown device {name!r}; use auto, cpu or cuda[:N]")
    if found.group(1) == "cuda":
        if not cuda.available:
            raise InputError(f"{name}: CUDA is not available on this machine; use the CPU", param="device")
        if found.group(2) is not None and int(found.group(2)) >= cuda.count:
            raise InputError(f"{name}: only {cuda.count} CUDA device(s)", param="device")
    return name


def choose_precision(name: str, device: str, cuda_bf16: bool = False, cpu_bf16: bool = True) -> str:
    """"float32", "bfloat16" or "float16" for `--precision` on `device`. Training keeps fp32 on every
    CPU (`cpu_bf16=False`): its recipes were made at fp32 there."""
    name = default_precision(name)
    if name == "auto":
        if device.startswith("cuda") and cuda_bf16:
            return "bfloat16"
        if device == "cpu" and cpu_bf16 and native_bf16():
            return "bfloat16"
        return "float32"
    if name not in TORCH_DTYPES:
        raise InputError(f"unknown precision {name!r}; use auto, fp32, bf16 or fp16")
    if name == "fp16" and not device.startswith("cuda"):
        raise InputError("fp16 needs a GPU; use fp32 or bf16 on the CPU", param="precision")
    return TORCH_DTYPES[name]


def runtime_precision(precision: str) -> str:
    """An exported runtime's precision ("f32" or "bf16") for the run's ("float32", "bfloat16")."""
    return "bf16" if precision == "bfloat16" else "f32"


def choose_runtimes(engine: str, device: str, installed: set[str], exporter: bool) -> tuple[str, ...]:
    """The exported runtimes a run of `engine` on `device` uses, in the order auto tries them; ()
    where torch runs the model (named, on a GPU, or nothing else installed for auto). `installed`:
    the runtimes whose packages are installed; `exporter`: whether onnxscript is."""
    if engine == "torch" or (engine == "auto" and not device == "cpu"):
        return ()
    if device != "cpu":
        raise InputError(f"{engine} runs on the CPU; the device is {device}", param="engine")
    runtimes = tuple(r for r in RUNTIMES if (engine == "auto" or r == engine) and r in installed)
    if not exporter or not runtimes:
        if engine != "auto":
            package = "onnxscript" if not exporter else RUNTIMES[engine].package
            raise InputError(f"{engine} needs {package} (pip install {RUNTIMES[engine].package} onnxscript)",
                             param="engine")
        return ()
    return runtimes


def installed_runtimes() -> set[str]:
    return {name for name, runtime in RUNTIMES.items() if runtime.available()}


def recorded_timing(meta: Path, machine: str, runtimes: tuple[str, ...]) -> dict | None:
    """The timing of torch and of those of `runtimes` that were timed, recorded in an export's
    cache entry for `machine`, if it holds torch's and at least one runtime's."""
    try:
        timing = json.loads(meta.read_text()).get("timings", {}).get(machine)
    except (OSError, ValueError, AttributeError):
        return None
    if not isinstance(timing, dict) or not isinstance(timing.get("torch"), (int, float)):
        return None
    timed = {k: timing[k] for k in ("torch", *runtimes) if isinstance(timing.get(k), (int, float))}
    return timed if len(timed) > 1 else None


def fastest(timing: dict) -> str:
    return min(timing, key=timing.get)


def warm_choice(timing: Any, shape: tuple[int, int], tiles: int | None = None) -> str | None:
    """The exported runtime a warm start uses for `tiles` tiles of `shape` (None: as many as the
    largest image run without torch, `MAX_PIXELS`) given this machine's timing of one tile in each
    engine, or None for torch: the fastest exported runtime, unless torch is so much faster per tile
    that over those tiles it gains back its start-up."""
    if not isinstance(timing, dict) or not isinstance(timing.get("torch"), (int, float)):
        return None
    exported = [r for r in RUNTIMES if RUNTIMES[r].available() and isinstance(timing.get(r), (int, float))]
    if not exported:
        return None
    best = min(exported, key=timing.get)
    tiles = tiles if tiles is not None else math.ceil(MAX_PIXELS / (shape[0] * shape[1]))
    return None if (timing[best] - timing["torch"]) * tiles > TORCH_START_S else best


@dataclass(frozen=True)
class WarmStart:
    """A run that starts without torch: the cached card, the runtime precision ("f32", "bf16") and
    the compute threads."""

    card: ModelCard
    precision: str
    threads: int


def warm_start(model: str, settings: Settings) -> WarmStart | None:
    """The warm start of a plain CPU run whose model card is cached, or None (torch decides)."""
    engine = settings.engine
    if settings.device not in ("auto", "cpu") or engine not in ("auto", *RUNTIMES) or not settings.plain:
        return None
    if settings.device == "auto" and has_cuda():
        return None
    precision = cpu_precision(settings.precision)
    found = model_file(model)
    if precision is None or found is None or (engine != "auto" and not RUNTIMES[engine].available()):
        return None
    card = read_card(found[1], str(found[0]))
    if card is None:
        return None
    return WarmStart(card, precision, settings.threads or default_threads())


def cpu_precision(precision: str) -> str | None:
    """The exported runtime's precision for `--precision` on the CPU (as `choose_precision` decides
    it), or None where only torch can say what it means (an error)."""
    name = default_precision(precision)
    if name == "auto":
        return "bf16" if native_bf16() else "f32"
    return {"fp32": "f32", "bf16": "bf16"}.get(name)


def has_cuda() -> bool:
    """Whether an NVIDIA GPU may be there (auto would pick it): then torch decides."""
    return any(Path(p).exists() for p in ("/dev/nvidia0", "/proc/driver/nvidia/version")) or \
        bool(os.environ.get("CUDA_VISIBLE_DEVICES"))


def names(runtimes: tuple[str, ...]) -> str:
    return " and ".join(label(r) for r in runtimes)
