"""Inference engines: the model as a function from normalised (n, bands, h, w) tensors to logits.

- `torch`: the model itself (any device).
- `openvino` and `onnx`: the model exported to ONNX in fp32 (torch's exporter, batch left dynamic,
  one export per tile shape) and run on the CPU by OpenVINO, at the run's precision (fp32, or bf16
  where the CPU has bf16 units, as OpenVINO reports them: `bigseg.cache.native_bf16`; OpenVINO would
  pick bf16 on such a CPU by itself, so the precision is always set), or by ONNX Runtime (fp32).
  Which is fastest depends on the CPU (docs/engines.md has the figures per CPU kind), and ONNX
  Runtime also serves Windows on arm64, where OpenVINO has no wheels; so both stay, and `auto`
  chooses. A runtime the user names that cannot run the model is an error, never a silent torch run. Tiles are padded (as the models pad them,
  reflecting) to the model's `output_multiple` first, so images whose sizes differ by less than
  that share one export. Exports are cached in the user's cache folder under a key of everything
  that shapes them (weights digest, architecture and config, bands, padded tile shape, opset,
  torch and exporter versions), written atomically and readable by others (a shared cache);
  OpenVINO keeps its compiled blobs beside them (`openvino/`), so a warm start does not compile.
  An entry whose recorded sha256 does not match, or that a runtime refuses, is exported again (or
  run elsewhere) with a note, never trusted blindly. A fresh export is checked against torch on a
  random batch before use. A model that cannot be exported (e.g. data-dependent routing) falls back
  to torch, said once.
- `auto` (the default; `$BIGSEG_ENGINE` changes it): `torch` on a GPU; on the CPU whichever of
  OpenVINO, ONNX Runtime and torch runs the tile shape fastest on this machine, timed once when
  the shape is exported (best of interleaved calls, so that a burst of other load does not decide)
  and kept with the cache entry, per CPU model, thread count, precision and allocator setting.
  An export costs tens of seconds and pays off only over many tiles, so for a model of the user's
  own `auto` first runs a shape with no cached export in torch and exports it only once torch has
  spent `AUTO_EXPORT_AFTER_S` on it (the ski-rental rule: never more than about twice the better
  choice's time), saying so before the export starts; the torch time is kept in the cache per
  shape, so separate runs (a shell loop over rasters) add up too. A shipped model (run again and
  again) is exported at its first batch instead (the predictor sets `export_after` to 0).
"""
from __future__ import annotations

import contextlib
import io
import json
import logging
import math
import os
import re
import tempfile
import time
import warnings
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn

from bigseg.atomic import remove, write_text
from bigseg.cache import OPSET, cache_dir, export_key, machine, native_bf16, runtime_versions
from bigseg.compiled import NAMES, RUNTIMES, available, open_export, shareable
from bigseg.errors import EngineError, InputError
from bigseg.manifest import sha256

ENGINES = ("auto", "torch", "openvino", "onnx")
PACKAGES = {"openvino": "openvino", "onnx": "onnxruntime"}
MAX_BATCH = 4096
STALE_SECONDS = 3600  # a temporary export file this old belongs to no running export
CHECK_TOLERANCE = 1e-3  # relative to the logits' range: a fresh export must match torch this well
AUTO_EXPORT_AFTER_S = 30.0  # auto: torch seconds on a shape before exporting it (about one export's cost)


def default_engine() -> str:
    """`$BIGSEG_ENGINE` (auto, torch, openvino or onnx) when set, else auto."""
    return os.environ.get("BIGSEG_ENGINE") or "auto"


def _missing(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is None


class TorchEngine:
    """The model itself."""

    name = "torch"

    def __init__(self, model: nn.Module):
        self.model = model

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


class ExportedEngine:
    """The model exported to ONNX and run by OpenVINO or ONNX Runtime on the CPU, one cached export
    per padded input shape (h, w).

    `identity`: what identifies the weights and architecture in the cache key; `note`: says
    something once (an export, a rebuilt cache entry, a fallback to torch); `runtimes`: the
    runtimes to use ("openvino", "onnx"); `choose` (auto): run each shape in whichever of them and
    torch is fastest on this machine; `precision`: "f32" or "bf16" (OpenVINO's; ONNX Runtime and
    the check compute in fp32); `multiple`: the model's padding multiple."""

    def __init__(self, model: nn.Module, identity: dict, threads: int, note: Callable[[str], None],
                 folder: Path | None = None, choose: bool = False, precision: str = "f32", multiple: int = 1,
                 runtimes: tuple[str, ...] = ("openvino",)):
        self.model, self.identity, self.threads, self.note, self.choose = model, identity, threads, note, choose
        self.precision, self.multiple, self.runtimes = precision, multiple, tuple(runtimes)
        self.name = "auto" if choose else self.runtimes[0]
        self.folder = (folder or cache_dir()) / "onnx"
        self.compiled_cache = (folder or cache_dir()) / "openvino"
        self.sessions: dict[tuple[int, int], Callable | None] = {}  # None: this shape runs in torch
        self.chosen: dict[tuple[int, int], str] = {}  # the runtime of each shape ("torch" too)
        self.exportable = True  # False once an export failed (auto): every shape then runs in torch
        self.failed: str | None = None  # why the export failed in this run
        self.export_after = AUTO_EXPORT_AFTER_S if choose else 0.0
        self.torch_seconds: dict[tuple[int, int], float] = {}  # auto: torch time per shape not yet exported
        if precision == "bf16" and "openvino" in self.runtimes and not native_bf16():
            note("this CPU has no bf16 units (AMX or AVX-512 BF16): OpenVINO computes in fp32 here")

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        h, w = int(x.shape[-2]), int(x.shape[-1])
        x = _pad(x, self.multiple)  # as the model pads: one export serves every size up to the multiple
        shape = (int(x.shape[-2]), int(x.shape[-1]))
        bands = int(x.shape[1])
        if shape not in self.sessions and self.exportable and self._defer(shape, bands):
            start = time.perf_counter()
            y = self.model(x)
            self.torch_seconds[shape] += time.perf_counter() - start
            self._save_rent(shape, bands)
            return y[..., :h, :w]
        if shape not in self.sessions:
            self.sessions[shape] = self._choose(shape, bands) if self.exportable else None
        run = self.sessions[shape]
        if run is None:
            return self.model(x)[..., :h, :w]
        return torch.from_numpy(np.array(run(np.ascontiguousarray(x.float().numpy()))[..., :h, :w]))

    def key(self, shape: tuple[int, int], bands: int) -> str:
        return export_key(self.identity, shape, bands)

    def _export_path(self, shape: tuple[int, int], bands: int) -> Path | None:
        """The checked export of `shape`, from the cache or made now; None where the model cannot be
        exported (it then runs in torch, said once)."""
        key = self.key(shape, bands)
        path, meta = self.folder / f"{key}.onnx", self.folder / f"{key}.json"
        if path.is_file() and self._intact(path, meta):
            return path
        failed = self.failure(shape, bands)
        if failed is not None:
            return self._unexportable(failed, earlier=True)
        took = _recorded_export_seconds(self.folder)
        self.note(f"exporting the model for {' and '.join(NAMES[r] for r in self.runtimes)}, {shape[0]}x{shape[1]} "
                  f"tiles: once, " + (f"about {took:.0f} s here" if took else "tens of seconds")
                  + f"; cached in {self.folder} for every later run")
        try:
            start = time.perf_counter()
            self._export(path, meta, shape, bands)
            _record_export_seconds(self.folder, time.perf_counter() - start)
            return path
        except Exception as e:  # export or check failed: auto runs this model in torch, a named engine stops
            remove(path)
            reason = re.sub(r"\x1b\[[0-9;]*m", "", str(e)).strip().split(". ")[0].splitlines()[0][:100]
            reason = f"{type(e).__name__}: {reason}"
            with contextlib.suppress(OSError):  # later runs with these versions do not try again
                write_text(self._failure_path(shape, bands),
                           json.dumps({"reason": reason, "versions": runtime_versions()}))
            return self._unexportable(reason)

    def _unexportable(self, reason: str, earlier: bool = False) -> None:
        """The model cannot be exported: `auto` runs it in torch (said once); a named engine is an
        error, since the user asked for that engine."""
        self.failed = reason
        if not self.choose:  # every later call of a named engine says it again, without trying again
            when = " (an earlier export with the same versions failed; an upgrade tries again)" if earlier else ""
            raise EngineError(f"the model cannot be exported for {NAMES[self.runtimes[0]]}{when}: {reason}; "
                              f"use --engine torch, or auto to fall back by itself", param="engine")
        self.exportable = False
        earlier_run = "an earlier run's export failed: " if earlier else ""
        self.note(f"the model cannot be exported ({earlier_run}{reason}): using torch")
        return None

    def _failure_path(self, shape: tuple[int, int], bands: int) -> Path:
        return self.folder / f"{self.key(shape, bands)}.failed.json"

    def failure(self, shape: tuple[int, int], bands: int) -> str | None:
        """Why an earlier export of `shape` failed, if it failed with the runtimes installed now."""
        if self.failed is not None:
            return self.failed
        try:
            record = json.loads(self._failure_path(shape, bands).read_text())
        except (OSError, ValueError):
            return None
        if not isinstance(record, dict) or record.get("versions") != runtime_versions():
            return None
        return str(record.get("reason") or "unknown reason")

    def _intact(self, path: Path, meta: Path) -> bool:
        try:
            recorded = json.loads(meta.read_text())["sha256"]
        except (OSError, ValueError, KeyError):
            recorded = None
        if recorded != sha256(path):
            self.note(f"the cached export {path.name} is damaged or incomplete: exporting it again")
            return False
        return True

    def _open(self, path: Path, runtime: str, precision: str | None = None, cached: bool = True):
        return open_export(path, runtime, precision or self.precision, self.threads,
                           self.compiled_cache if cached else None)

    def _run(self, path: Path, runtime: str):
        """The export through `runtime`, or None (and a note) where the runtime cannot load it; an
        error where the user named that runtime."""
        try:
            return self._open(path, runtime)
        except Exception as e:  # each runtime raises its own types for a model it refuses
            if not self.choose:
                raise EngineError(f"{NAMES[runtime]} cannot load the export {path.name} ({type(e).__name__}); "
                                  f"use --engine torch, or auto to fall back by itself", param="engine") from None
            self.note(f"{NAMES[runtime]} cannot load the cached export {path.name}: using another engine")
            return None

    def _defer(self, shape: tuple[int, int], bands: int) -> bool:
        """Whether `shape` should still run in torch before an export is worth its cost: (auto)
        no export of it is cached and torch has run it for less than `export_after` seconds."""
        if shape not in self.torch_seconds:
            cached = (self.folder / f"{self.key(shape, bands)}.onnx").is_file()
            if cached or self.export_after <= 0:
                return False
            failed = self.failure(shape, bands)
            if failed is not None:
                self._unexportable(failed, earlier=True)
                return False
            self.torch_seconds[shape] = self._rent(shape, bands)
        return self.torch_seconds[shape] < self.export_after

    def _rent_path(self, shape: tuple[int, int], bands: int) -> Path:
        return self.folder / f"{self.key(shape, bands)}.torch-seconds"

    def _rent(self, shape: tuple[int, int], bands: int) -> float:
        """Torch seconds that earlier runs spent on `shape` without exporting it (a shell loop of
        one raster per run adds up to an export like one run over a folder does)."""
        try:
            text = self._rent_path(shape, bands).read_text()
        except OSError:
            return 0.0
        try:
            return max(0.0, float(text))
        except ValueError:
            return 0.0

    def _save_rent(self, shape: tuple[int, int], bands: int) -> None:
        with contextlib.suppress(OSError):  # a read-only cache only forgets the time spent
            self.folder.mkdir(parents=True, exist_ok=True)
            write_text(self._rent_path(shape, bands), f"{self.torch_seconds[shape]:.3f}")

    def padded(self, shape: tuple[int, int]) -> tuple[int, int]:
        m = self.multiple
        return -(-shape[0] // m) * m, -(-shape[1] // m) * m

    def expected_runtime(self, shape: tuple[int, int], bands: int) -> str | None:
        """The runtime `shape` will run in, as far as is known before running it; None for torch: a
        model that failed to export (here or, with auto, in an earlier run) or (auto) a shape
        recorded as faster in torch here."""
        shape = self.padded(shape)
        if not self.exportable or self.sessions.get(shape, True) is None:
            return None
        if shape in self.chosen:
            return None if self.chosen[shape] == "torch" else self.chosen[shape]
        if not self.choose:
            return self.runtimes[0]
        if self.failure(shape, bands) is not None:  # an earlier run's export failed: torch
            return None
        timing = _recorded_timing(self.folder / f"{self.key(shape, bands)}.json", self._machine(), self.runtimes)
        if timing is None:
            return self.runtimes[0]  # not timed yet: assume the first runtime
        best = min(timing, key=timing.get)
        return None if best == "torch" else best

    def timing(self, shape: tuple[int, int], bands: int) -> dict | None:
        """This machine's recorded timing of the padded `shape` (seconds a tile per engine)."""
        return _recorded_timing(self.folder / f"{self.key(shape, bands)}.json", self._machine(), self.runtimes)

    @property
    def bf16_openvino(self) -> bool:
        """OpenVINO computes in bf16 here (asked for, and the CPU has the units)."""
        return self.precision == "bf16" and "openvino" in self.runtimes and native_bf16()

    def _machine(self) -> str:
        return machine(self.threads, self.precision)

    def _choose(self, shape: tuple[int, int], bands: int):
        """The runner of `shape`, or None where torch runs it: a model that cannot be exported, or
        (auto) a shape that torch runs fastest on this machine."""
        meta = self.folder / f"{self.key(shape, bands)}.json"
        timing = _recorded_timing(meta, self._machine(), self.runtimes) if self.choose else None
        if timing is not None and min(timing, key=timing.get) == "torch":
            self.chosen[shape] = "torch"
            return None  # known: no need to load the export at all
        path = self._export_path(shape, bands)
        if path is None:
            return None
        if not self.choose:
            self.chosen[shape] = self.runtimes[0]
            return self._run(path, self.runtimes[0])
        if timing is not None:
            best = min(timing, key=timing.get)
            self.chosen[shape] = best
            return self._run(path, best)
        return self._race(shape, bands, path, meta)

    def _race(self, shape: tuple[int, int], bands: int, path: Path, meta: Path):
        """Time the runtimes and torch on one tile of this shape once (a few seconds), keep the
        timing with the cache entry (per machine), and run the fastest. Where OpenVINO computes in
        bf16 on bf16 units, ONNX Runtime (fp32 only) is not timed: it cannot win there (half
        OpenVINO bf16's speed or less, docs/engines.md)."""
        runtimes = [r for r in self.runtimes if not (r == "onnx" and self.bf16_openvino)]
        runners = {r: run for r in runtimes if (run := self._run(path, r)) is not None}
        example = torch.randn(1, bands, *shape, generator=torch.Generator().manual_seed(1))
        autocast = torch.autocast("cpu", dtype=torch.bfloat16) if self.precision == "bf16" else contextlib.nullcontext()

        def in_torch():
            with autocast:
                self.model(example.contiguous(memory_format=torch.channels_last))
        x = example.numpy()
        timing = _race({**{r: (lambda run=run: run(x)) for r, run in runners.items()}, "torch": in_torch})
        with contextlib.suppress(OSError, ValueError):  # kept with the entry it was measured on
            record = json.loads(meta.read_text())
            record.setdefault("timings", {})[self._machine()] = timing
            write_text(meta, json.dumps(record, default=str))
        best = min(timing, key=timing.get)
        self.chosen[shape] = best
        self.note(f"{NAMES[best]} is fastest here on {shape[0]}x{shape[1]} tiles ("
                  + ", ".join(f"{NAMES[k]} {v:.2f} s" for k, v in timing.items())
                  + f" a tile, {self.precision}): using it (measured once; --engine chooses)")
        return runners.get(best)

    def _export(self, path: Path, meta: Path, shape: tuple[int, int], bands: int) -> None:
        """Export, check against torch on a random batch, then commit the file and its record."""
        from torch.export import Dim

        self.folder.mkdir(parents=True, exist_ok=True)
        for stale in self.folder.glob(".*.onnx"):  # left by an export that was killed
            with contextlib.suppress(OSError):
                if time.time() - stale.stat().st_mtime > STALE_SECONDS:
                    remove(stale)
        example = torch.randn(2, bands, *shape, generator=torch.Generator().manual_seed(0))
        fd, tmp_name = tempfile.mkstemp(dir=self.folder, prefix=f".{path.stem}.", suffix=".onnx")
        os.close(fd)
        tmp = Path(tmp_name)
        try:
            # the predictor calls engines inside its bf16 autocast: the export is always the fp32 graph,
            # which OpenVINO then runs at its inference precision (bf16 where the CPU has the units)
            with _quiet(), torch.autocast("cpu", enabled=False):
                program = torch.onnx.export(self.model, (example,), dynamo=True, opset_version=OPSET,
                                            input_names=["x"], output_names=["logits"], external_data=False,
                                            dynamic_shapes=({0: Dim("batch", min=1, max=MAX_BATCH)},))
                program.save(str(tmp), external_data=False)
            self._check(tmp, example)
            shareable(tmp)
            os.replace(tmp, path)
        finally:
            remove(tmp)
        write_text(meta, json.dumps({**self.identity, "shape": shape, "bands": bands, "opset": OPSET,
                                     "torch": torch.__version__, "sha256": sha256(path)}, default=str))
        shareable(meta)
        remove(self._rent_path(shape, bands))  # exported: the time spent in torch no longer matters

    def _check(self, path: Path, example: torch.Tensor) -> None:
        """The export computes what torch computes (at fp32, whatever the run's precision)."""
        with torch.inference_mode(), torch.autocast("cpu", enabled=False):
            expected = self.model(example).float().numpy()
        got = self._open(path, self.runtimes[0], "f32", cached=False)(example.numpy())  # a temporary file: uncached
        scale = max(float(np.abs(expected).max()), 1e-6)
        if got.shape != expected.shape or float(np.abs(got - expected).max()) > CHECK_TOLERANCE * scale:
            raise ValueError("its outputs differ from torch's")


def _pad(x: torch.Tensor, multiple: int) -> torch.Tensor:
    """Bottom and right reflect padding to a multiple, as `bigseg.models.blocks.pad_to_multiple`."""
    h, w = x.shape[-2:]
    ph, pw = (-h) % multiple, (-w) % multiple
    if ph == 0 and pw == 0:
        return x
    mode = "reflect" if ph < h and pw < w else "replicate"
    return torch.nn.functional.pad(x, (0, pw, 0, ph), mode=mode)


def _recorded_export_seconds(folder: Path) -> float | None:
    try:
        return float((folder / "export-seconds").read_text())
    except (OSError, ValueError):
        return None


def _record_export_seconds(folder: Path, seconds: float) -> None:
    with contextlib.suppress(OSError):
        write_text(folder / "export-seconds", f"{seconds:.1f}")


def _recorded_timing(meta: Path, machine: str, runtimes: tuple[str, ...]) -> dict | None:
    """The timing of torch and those of `runtimes` that were timed, recorded in a cache entry's
    record for `machine`, if it holds torch's and at least one runtime's."""
    try:
        timing = json.loads(meta.read_text()).get("timings", {}).get(machine)
    except (OSError, ValueError, AttributeError):
        return None
    if not isinstance(timing, dict) or not isinstance(timing.get("torch"), (int, float)):
        return None
    timed = {k: timing[k] for k in ("torch", *runtimes) if isinstance(timing.get(k), (int, float))}
    return timed if len(timed) > 1 else None


def _race(runs: dict[str, Callable[[], object]], rounds: int = 2) -> dict[str, float]:
    """Each run's best wall seconds over `rounds` timed calls after one warm-up call each, the
    calls interleaved (A B, then B A): a burst of other load on the machine slows one call of
    one engine, not the choice that is recorded for good."""
    names = list(runs)
    best = dict.fromkeys(names, math.inf)
    with torch.inference_mode():
        for name in names:
            runs[name]()
        for r in range(rounds):
            for name in (names if r % 2 == 0 else names[::-1]):
                start = time.perf_counter()
                runs[name]()
                best[name] = min(best[name], time.perf_counter() - start)
    return best


@contextlib.contextmanager
def _quiet():
    """The exporter's progress messages and warnings are not the user's business."""
    loggers = [logging.getLogger(n) for n in ("torch.onnx", "torch.export", "torch._dynamo", "onnxscript")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), \
                contextlib.redirect_stderr(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def make_engine(name: str, model: nn.Module, device: torch.device, identity: dict, threads: int,
                note: Callable[[str], None], precision: str = "f32") -> TorchEngine | ExportedEngine:
    """The engine `name` (auto, torch, openvino or onnx) for `model` on `device`; `precision` ("f32"
    or "bf16") is OpenVINO's inference precision."""
    if name not in ENGINES:
        raise InputError(f"takes {', '.join(ENGINES)}, got {name!r}", param="engine")
    if name == "torch" or (name == "auto" and device.type != "cpu"):
        return TorchEngine(model)
    if device.type != "cpu":
        raise InputError(f"{name} runs on the CPU; the device is {device}", param="engine")
    runtimes = tuple(r for r in RUNTIMES if (name == "auto" or r == name) and available(r))
    if _missing("onnxscript") or not runtimes:
        if name != "auto":
            raise InputError(f"{name} needs {'onnxscript' if _missing('onnxscript') else PACKAGES[name]} "
                             f"(pip install {PACKAGES[name]} onnxscript)", param="engine")
        return TorchEngine(model)  # no exported runtime installed here: torch
    return ExportedEngine(model, identity, threads, note, choose=name == "auto", precision=precision,
                          multiple=getattr(model, "output_multiple", 1), runtimes=runtimes)
