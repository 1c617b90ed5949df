"""The exported runtimes inside a torch run: the model as a torch callable whose tiles run through
OpenVINO or ONNX Runtime (`engines.export` makes and keeps the exports), one per padded tile shape.

- A named runtime (`--engine openvino|onnx`) that cannot run the model is an error, never a silent
  torch run.
- `auto` runs each shape in whichever of the installed runtimes and torch is fastest on this
  machine, timed once when the shape is exported (best of interleaved calls, so that a burst of
  other load does not decide) and kept with the cache entry, per CPU model, thread count,
  precision and allocator setting (`bigseg.infer.cache.machine`). Where OpenVINO computes in bf16
  on bf16 units ONNX Runtime (fp32 only) is not timed: it cannot win there (docs/engines.md). An
  export costs tens of seconds and pays off only over many tiles, so `auto` first runs a shape with
  no cached export in torch and exports it once torch has spent `export_after` seconds on it (the
  ski-rental rule: never more than about twice the better choice's time), the torch time kept in
  the cache so that separate runs add up. A shipped model is exported at its first batch instead.
  A model that cannot be exported (e.g. data-dependent routing) runs in torch, said once.
"""
from __future__ import annotations

import math
import re
import time
from typing import Callable

import numpy as np
import torch
from torch import nn

from bigseg.errors import EngineError
from bigseg.infer.cache import machine, native_bf16
from bigseg.infer.card import padded
from bigseg.infer.choose import AUTO_EXPORT_AFTER_S, fastest, names
from bigseg.infer.engines.base import RUNTIMES, Compiled, label
from bigseg.infer.engines.export import ExportCache, Shape, export

TORCH = "torch"


class ExportedModel:
    """`model` as a function of normalised (n, bands, h, w) tensors whose tiles run in the exported
    `runtimes` ("openvino", "onnx"; `choose`: auto, per shape the fastest of them and torch) at
    `precision` ("f32" or "bf16"), padded to the model's `multiple` first so that sizes within one
    multiple share an export."""

    def __init__(self, model: nn.Module, cache: ExportCache, runtimes: tuple[str, ...], threads: int,
                 note: Callable[[str], None], choose: bool = False, precision: str = "f32", multiple: int = 1):
        self.model, self.cache, self.runtimes, self.threads, self.note = model, cache, tuple(runtimes), threads, note
        self.choose, self.precision, self.multiple = choose, precision, multiple
        self.name = "auto" if choose else self.runtimes[0]
        self.sessions: dict[Shape, Compiled | None] = {}  # None: this shape runs in torch
        self.chosen: dict[Shape, str] = {}  # the runtime of each shape ("torch" too)
        self.failed: str | None = None  # why the export failed in this run (every shape then runs in torch)
        self.export_after = AUTO_EXPORT_AFTER_S if choose else 0.0
        self.torch_seconds: dict[Shape, float] = {}  # auto: torch time per shape not yet exported
        if precision == "bf16" and "openvino" in self.runtimes and not native_bf16():
            note("this CPU has no bf16 units (AMX or AVX-512 BF16): OpenVINO computes in fp32 here")

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        h, w = int(x.shape[-2]), int(x.shape[-1])
        x = pad(x, self.multiple)  # as the model pads: one export serves every size up to the multiple
        shape = (int(x.shape[-2]), int(x.shape[-1]))
        if shape not in self.sessions and self.failed is None and self.defer(shape):
            start = time.perf_counter()
            y = self.model(x)
            self.torch_seconds[shape] += time.perf_counter() - start
            self.cache.save_torch_seconds(shape, self.torch_seconds[shape])
            return y[..., :h, :w]
        if shape not in self.sessions:
            # after a failed export auto runs torch; a named runtime says the error again
            self.sessions[shape] = self.session(shape) if self.failed is None or not self.choose else None
        run = self.sessions[shape]
        if run is None:
            return self.model(x)[..., :h, :w]
        return torch.from_numpy(np.array(run(np.ascontiguousarray(x.float().numpy()))[..., :h, :w]))

    @property
    def bf16_openvino(self) -> bool:
        """OpenVINO computes in bf16 here (asked for, and the CPU has the units)."""
        return self.precision == "bf16" and "openvino" in self.runtimes and native_bf16()

    @property
    def machine(self) -> str:
        return machine(self.threads, self.precision)

    def padded(self, shape: Shape) -> Shape:
        return padded(shape, self.multiple)

    def failure(self, shape: Shape) -> str | None:
        """Why the export of `shape` failed, in this run or an earlier one with these versions."""
        return self.failed if self.failed is not None else self.cache.failure(shape)

    def expected_runtime(self, shape: Shape) -> str | None:
        """The runtime `shape` will run in, as far as is known before running it; None for torch: a
        model that failed to export (here or, with auto, in an earlier run) or (auto) a shape
        recorded as faster in torch here."""
        shape = self.padded(shape)
        if self.failed is not None or self.sessions.get(shape, True) is None:
            return None
        if shape in self.chosen:
            return None if self.chosen[shape] == TORCH else self.chosen[shape]
        if not self.choose:
            return self.runtimes[0]
        if self.failure(shape) is not None:
            return None
        timing = self.cache.timing(shape, self.machine, self.runtimes)
        if timing is None:
            return self.runtimes[0]  # not timed yet: assume the first runtime
        return None if fastest(timing) == TORCH else fastest(timing)

    def defer(self, shape: Shape) -> bool:
        """Whether `shape` should still run in torch before an export is worth its cost: (auto) no
        export of it is cached and torch has run it for less than `export_after` seconds."""
        if shape not in self.torch_seconds:
            if self.cache.path(shape).is_file() or self.export_after <= 0:
                return False
            failed = self.failure(shape)
            if failed is not None:
                self.unexportable(failed, earlier=True)
                return False
            self.torch_seconds[shape] = self.cache.torch_seconds(shape)
        return self.torch_seconds[shape] < self.export_after

    def session(self, shape: Shape) -> Compiled | None:
        """The runner of `shape`, or None where torch runs it: a model that cannot be exported, or
        (auto) a shape that torch runs fastest on this machine."""
        timing = self.cache.timing(shape, self.machine, self.runtimes) if self.choose else None
        if timing is not None and fastest(timing) == TORCH:
            self.chosen[shape] = TORCH
            return None  # known: no need to load the export at all
        if not self.exported(shape):
            return None
        if not self.choose or timing is not None:
            runtime = self.runtimes[0] if not self.choose else fastest(timing)
            self.chosen[shape] = runtime
            return self.open(shape, runtime)
        return self.race(shape)

    def exported(self, shape: Shape) -> bool:
        """Whether the checked export of `shape` is in the cache, made now if need be; False where
        the model cannot be exported (it then runs in torch, said once)."""
        path = self.cache.path(shape)
        if path.is_file():
            if self.cache.intact(shape):
                return True
            self.note(f"the cached export {path.name} is damaged or incomplete: exporting it again")
        failed = self.failure(shape)
        if failed is not None:
            return self.unexportable(failed, earlier=True)
        took = self.cache.export_seconds()
        self.note(f"exporting the model for {names(self.runtimes)}, {shape[0]}x{shape[1]} tiles: once, "
                  + (f"about {took:.0f} s here" if took else "tens of seconds")
                  + f"; cached in {self.cache.folder} for every later run")
        check = lambda tmp: RUNTIMES[self.runtimes[0]].open(tmp, "f32", self.threads, None)  # uncached: temporary
        try:
            export(self.model, self.cache, shape, check)
            return True
        except Exception as e:  # export or check failed: auto runs this model in torch, a named engine stops
            reason = re.sub(r"\x1b\[[0-9;]*m", "", str(e)).strip().split(". ")[0].splitlines()[0][:100]
            reason = f"{type(e).__name__}: {reason}"
            self.cache.record_failure(shape, reason)
            return self.unexportable(reason)

    def unexportable(self, reason: str, earlier: bool = False) -> bool:
        """The model cannot be exported: `auto` runs it in torch (said once); a named engine is an
        error, since the user asked for that engine."""
        self.failed = reason
        if not self.choose:
            when = " (an earlier export with the same versions failed; an upgrade tries again)" if earlier else ""
            raise EngineError(f"the model cannot be exported for {label(self.runtimes[0])}{when}: {reason}; "
                              f"use --engine torch, or auto to fall back by itself", param="engine")
        earlier_run = "an earlier run's export failed: " if earlier else ""
        self.note(f"the model cannot be exported ({earlier_run}{reason}): using torch")
        return False

    def open(self, shape: Shape, runtime: str) -> Compiled | None:
        """The export through `runtime`, or None (and a note) where the runtime cannot load it; an
        error where the user named that runtime."""
        path = self.cache.path(shape)
        try:
            return RUNTIMES[runtime].open(path, self.precision, self.threads, self.cache.compiled)
        except Exception as e:  # each runtime raises its own types for a model it refuses
            if not self.choose:
                raise EngineError(f"{label(runtime)} cannot load the export {path.name} ({type(e).__name__}); "
                                  f"use --engine torch, or auto to fall back by itself", param="engine") from None
            self.note(f"{label(runtime)} cannot load the cached export {path.name}: using another engine")
            return None

    def race(self, shape: Shape) -> Compiled | None:
        """Time the runtimes and torch on one tile of `shape` once (a few seconds), keep the timing
        with the cache entry (per machine), and run the fastest."""
        runtimes = [r for r in self.runtimes if not (r == "onnx" and self.bf16_openvino)]
        runners = {r: run for r in runtimes if (run := self.open(shape, r)) is not None}
        example = torch.randn(1, self.cache.bands, *shape, generator=torch.Generator().manual_seed(1))
        bf16 = self.precision == "bf16"

        def in_torch():
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                self.model(example.contiguous(memory_format=torch.channels_last))
        x = example.numpy()
        timing = race({**{r: (lambda run=run: run(x)) for r, run in runners.items()}, TORCH: in_torch})
        self.cache.save_timing(shape, self.machine, timing)
        best = self.chosen[shape] = fastest(timing)
        self.note(f"{label(best)} is fastest here on {shape[0]}x{shape[1]} tiles ("
                  + ", ".join(f"{label(k)} {v:.2f} s" for k, v in timing.items())
                  + f" a tile, {self.precision}): using it (measured once; --engine chooses)")
        return runners.get(best)


def pad(x: torch.Tensor, multiple: int) -> torch.Tensor:
    """Bottom and right reflect padding to a multiple, as `bigseg.models.blocks.pad_to_multiple`."""
    h, w = x.shape[-2:]
    ph, pw = (-h) % multiple, (-w) % multiple
    if ph == 0 and pw == 0:
        return x
    mode = "reflect" if ph < h and pw < w else "replicate"
    return torch.nn.functional.pad(x, (0, pw, 0, ph), mode=mode)


def race(runs: dict[str, Callable[[], object]], rounds: int = 2) -> dict[str, float]:
    """Each run's best wall seconds over `rounds` timed calls after one warm-up call each, the
    calls interleaved (A B, then B A): a burst of other load on the machine slows one call of one
    engine, not the choice that is recorded for good."""
    order = list(runs)
    best = dict.fromkeys(order, math.inf)
    with torch.inference_mode():
        for name in order:
            runs[name]()
        for r in range(rounds):
            for name in (order if r % 2 == 0 else order[::-1]):
                start = time.perf_counter()
                runs[name]()
                best[name] = min(best[name], time.perf_counter() - start)
    return best
