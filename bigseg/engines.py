"""Inference engines: the model as a function from normalised (n, bands, h, w) tensors to logits.

- `torch`: the model itself (any device).
- `onnx`: the model exported to ONNX (torch's exporter, batch left dynamic, one export per tile
  shape) and run by ONNX Runtime's CPU provider (`benchmarks/pipeline_throughput.py` compares
  them). Exports are cached in the user's cache
  folder under a key of everything that shapes them (weights digest, architecture and config,
  bands, tile shape, opset, torch and exporter versions) and written atomically; an entry whose
  recorded sha256 does not match, or that ONNX Runtime refuses, is exported again with a note,
  never trusted blindly. A fresh export is checked against torch on a random batch before use.
  A model that cannot be exported (e.g. data-dependent routing) falls back to torch, said once.
- `auto` (the default; `$BIGSEG_ENGINE` changes it): `torch` on a GPU; on the CPU whichever of
  ONNX Runtime and torch runs the tile shape faster on this machine. Which one is faster depends
  on the CPU (ONNX Runtime was about twice as fast as torch on an AVX-512 Xeon; on an AVX2 EPYC
  1.26x faster, and 1.17x slower once glibc kept freed memory), so the first time a shape is
  exported both are timed on the check batch (best of interleaved calls, so that a burst of
  other load does not decide) and the result is kept with the cache entry, per CPU model, thread
  count and allocator setting (`bigseg.runtime.keep_freed_memory`).
  An export costs tens of seconds (45 s for LDN121 here) and pays off only over many tiles, so
  `auto` first runs a shape with no cached export in torch and exports it only once torch has
  spent `AUTO_EXPORT_AFTER_S` on it (the ski-rental rule: never more than about twice the better
  choice's time): a single photo takes seconds, not a minute; a large raster or a folder of
  photos is exported after its first tiles and runs in the faster engine from then on. The torch
  time is kept in the cache per shape, so separate runs (a shell loop over rasters) add up too.
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import math
import os
import platform
import re
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn

from bigseg.atomic import remove, write_text
from bigseg.errors import InputError
from bigseg.manifest import sha256
from bigseg.runtime import keeps_freed_memory

ENGINES = ("auto", "torch", "onnx")
OPSET = 18
MAX_BATCH = 4096
STALE_SECONDS = 3600  # a temporary export file this old belongs to no running export
CHECK_TOLERANCE = 1e-3  # relative to the logits' range: a fresh export must match torch this well
AUTO_EXPORT_AFTER_S = 30.0  # auto: torch seconds on a shape before exporting it (about one export's cost)
UNEXPORTABLE = "unexportable"  # kept instead of the torch seconds once an export of the shape failed


def default_engine() -> str:
    """`$BIGSEG_ENGINE` (auto, torch or onnx) when set, else auto."""
    return os.environ.get("BIGSEG_ENGINE") or "auto"


def cache_dir() -> Path:
    """`$BIGSEG_CACHE`, else the platform's user cache folder (XDG on Linux)."""
    if os.environ.get("BIGSEG_CACHE"):
        return Path(os.environ["BIGSEG_CACHE"])
    if sys.platform == "darwin":
        return Path.home() / "Library" / "Caches" / "bigseg"
    if sys.platform == "win32":
        return Path(os.environ.get("LOCALAPPDATA", Path.home() / "AppData" / "Local")) / "bigseg" / "Cache"
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "bigseg"


def onnx_available() -> str | None:
    """None when ONNX Runtime and the exporter can be used, else what is missing."""
    missing = [m for m in ("onnxruntime", "onnxscript") if _missing(m)]
    return None if not missing else f"{' and '.join(missing)} not installed (pip install onnxruntime onnxscript)"


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


class OnnxEngine:
    """The model through ONNX Runtime on the CPU, one cached export per input shape (h, w).

    `identity`: what identifies the weights and architecture in the cache key; `note`: says
    something once (an export, a rebuilt cache entry, a fallback to torch); `choose` (auto):
    run each shape in whichever of ONNX Runtime and torch is faster on this machine."""

    name = "onnx"

    def __init__(self, model: nn.Module, identity: dict, threads: int, note: Callable[[str], None],
                 folder: Path | None = None, choose: bool = False):
        self.model, self.identity, self.threads, self.note, self.choose = model, identity, threads, note, choose
        self.folder = (folder or cache_dir()) / "onnx"
        self.sessions: dict[tuple[int, int], object | None] = {}  # None: this shape runs in torch
        self.exportable = True  # False once an export failed: every shape then runs in torch
        self.export_after = AUTO_EXPORT_AFTER_S if choose else 0.0
        self.torch_seconds: dict[tuple[int, int], float] = {}  # auto: torch time per shape not yet exported

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        shape = (int(x.shape[-2]), int(x.shape[-1]))
        if shape not in self.sessions and self.exportable and self._defer(shape, int(x.shape[1])):
            start = time.perf_counter()
            y = self.model(x)
            self.torch_seconds[shape] += time.perf_counter() - start
            self._save_rent(shape, int(x.shape[1]))
            return y
        if shape not in self.sessions:
            self.sessions[shape] = self._choose(shape, int(x.shape[1])) if self.exportable else None
        session = self.sessions[shape]
        if session is None:
            return self.model(x)
        return torch.from_numpy(session.run(None, {"x": np.ascontiguousarray(x.float().numpy())})[0])

    def key(self, shape: tuple[int, int], bands: int) -> str:
        import onnxscript

        facts = {**self.identity, "bands": bands, "shape": shape, "opset": OPSET, "torch": torch.__version__,
                 "onnxscript": onnxscript.__version__}
        return hashlib.sha256(json.dumps(facts, sort_keys=True, default=str).encode()).hexdigest()[:32]

    def _session(self, shape: tuple[int, int], bands: int):
        """A session for inputs of `shape`, from the cache or a fresh export; None to use torch."""
        key = self.key(shape, bands)
        path, meta = self.folder / f"{key}.onnx", self.folder / f"{key}.json"
        if path.is_file():
            session = self._open_cached(path, meta)
            if session is not None:
                return session
        self.note(f"exporting the model for ONNX Runtime, {shape[0]}x{shape[1]} tiles (once; cached in {self.folder})")
        try:
            self._export(path, meta, shape, bands)
            return self._open(path)
        except Exception as e:  # export or check failed: this model runs in torch
            remove(path)
            self.exportable = False
            reason = re.sub(r"\x1b\[[0-9;]*m", "", str(e)).strip().split(". ")[0].splitlines()[0][:100]
            self.note(f"the model cannot run in ONNX Runtime ({type(e).__name__}: {reason}): using torch")
            if self.choose:  # later runs of auto do not try again
                with contextlib.suppress(OSError):
                    write_text(self._rent_path(shape, bands), UNEXPORTABLE)
            return None

    def _open_cached(self, path: Path, meta: Path):
        try:
            recorded = json.loads(meta.read_text())["sha256"]
        except (OSError, ValueError, KeyError):
            recorded = None
        if recorded != sha256(path):
            self.note(f"the cached ONNX export {path.name} is damaged or incomplete: exporting it again")
            return None
        try:
            return self._open(path)
        except Exception:  # onnxruntime raises its own types for unreadable models
            self.note(f"ONNX Runtime cannot load the cached export {path.name}: exporting it again")
            return None

    def _defer(self, shape: tuple[int, int], bands: int) -> bool:
        """Whether `shape` should still run in torch before an export is worth its cost: (auto)
        no export of it is cached and torch has run it for less than `export_after` seconds."""
        if shape not in self.torch_seconds:
            cached = (self.folder / f"{self.key(shape, bands)}.onnx").is_file()
            if cached or self.export_after <= 0:
                return False
            spent = self._rent(shape, bands)
            if spent is None:
                self.exportable = False
                self.note("the model cannot run in ONNX Runtime (an earlier run's export failed): using torch")
                return False
            self.torch_seconds[shape] = spent
        return self.torch_seconds[shape] < self.export_after

    def _rent_path(self, shape: tuple[int, int], bands: int) -> Path:
        return self.folder / f"{self.key(shape, bands)}.torch-seconds"

    def _rent(self, shape: tuple[int, int], bands: int) -> float | None:
        """Torch seconds that earlier runs spent on `shape` without exporting it (a shell loop of
        one raster per run adds up to an export like one run over a folder does); None where an
        earlier run found that the model cannot be exported."""
        try:
            text = self._rent_path(shape, bands).read_text()
        except OSError:
            return 0.0
        if text == UNEXPORTABLE:
            return None
        try:
            return max(0.0, float(text))
        except ValueError:
            return 0.0

    def _save_rent(self, shape: tuple[int, int], bands: int) -> None:
        with contextlib.suppress(OSError):  # a read-only cache only forgets the time spent
            self.folder.mkdir(parents=True, exist_ok=True)
            write_text(self._rent_path(shape, bands), f"{self.torch_seconds[shape]:.3f}")

    def expects_onnx(self, shape: tuple[int, int], bands: int) -> bool:
        """Whether `shape` will run in ONNX Runtime, as far as is known before running it: False
        for a model that failed to export (here or, with auto, in an earlier run) or (auto) a shape
        recorded as faster in torch here."""
        if not self.exportable or self.sessions.get(shape, True) is None:
            return False
        if not self.choose:
            return True
        if self._rent(shape, bands) is None:  # an earlier run's export failed: torch
            return False
        timing = _recorded_timing(self.folder / f"{self.key(shape, bands)}.json", self._machine())
        return timing is None or timing["onnx"] <= timing["torch"]

    def _machine(self) -> str:
        return f"{_cpu_name()}, {self.threads} threads{', freed memory kept' if keeps_freed_memory() else ''}"

    def _choose(self, shape: tuple[int, int], bands: int):
        """The session for `shape`, or None where torch runs it: a model that cannot be exported,
        or (auto) a shape that torch runs faster on this machine."""
        if not self.choose:
            return self._session(shape, bands)
        meta = self.folder / f"{self.key(shape, bands)}.json"
        machine = self._machine()
        timing = _recorded_timing(meta, machine)
        if timing is not None and timing["torch"] < timing["onnx"]:
            return None  # known: no need to load the export at all
        session = self._session(shape, bands)
        if session is None or timing is not None:
            return session
        example = torch.randn(2, bands, *shape, generator=torch.Generator().manual_seed(1))
        timing = _race({"onnx": lambda: session.run(None, {"x": example.numpy()}),
                        "torch": lambda: self.model(example.contiguous(memory_format=torch.channels_last))})
        with contextlib.suppress(OSError, ValueError):  # kept with the entry it was measured on
            record = json.loads(meta.read_text())
            record.setdefault("timings", {})[machine] = timing
            write_text(meta, json.dumps(record, default=str))
        faster = "ONNX Runtime" if timing["onnx"] <= timing["torch"] else "torch"
        self.note(f"{faster} is faster here on {shape[0]}x{shape[1]} tiles (ONNX Runtime {timing['onnx']:.2f} s, "
                  f"torch {timing['torch']:.2f} s a batch of 2): using it (measured once; --engine chooses)")
        return session if timing["onnx"] <= timing["torch"] else None

    def _open(self, path: Path):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = self.threads
        options.inter_op_num_threads = 1
        # idle threads sleep instead of spinning, like torch's here: less CPU time and no slower
        # alone (3.26 against 3.51 CPU s per MP, ladder-dn121 on 1024-px tiles), far better beside
        # the reader's and writer's threads or any other load
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.log_severity_level = 3
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

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
            with _quiet():
                program = torch.onnx.export(self.model, (example,), dynamo=True, opset_version=OPSET,
                                            input_names=["x"], output_names=["logits"], external_data=False,
                                            dynamic_shapes=({0: Dim("batch", min=1, max=MAX_BATCH)},))
                program.save(str(tmp), external_data=False)
            self._check(tmp, example)
            os.replace(tmp, path)
        finally:
            remove(tmp)
        write_text(meta, json.dumps({**self.identity, "shape": shape, "bands": bands, "opset": OPSET,
                                     "torch": torch.__version__, "sha256": sha256(path)}, default=str))
        remove(self._rent_path(shape, bands))  # exported: the time spent in torch no longer matters

    def _check(self, path: Path, example: torch.Tensor) -> None:
        with torch.inference_mode():
            expected = self.model(example).float().numpy()
        got = self._open(path).run(None, {"x": example.numpy()})[0]
        scale = max(float(np.abs(expected).max()), 1e-6)
        if got.shape != expected.shape or float(np.abs(got - expected).max()) > CHECK_TOLERANCE * scale:
            raise ValueError("its outputs differ from torch's")


def _recorded_timing(meta: Path, machine: str) -> dict | None:
    """The engines' timing recorded in a cache entry's record for `machine`, if any."""
    try:
        timing = json.loads(meta.read_text()).get("timings", {}).get(machine)
    except (OSError, ValueError, AttributeError):
        return None
    ok = isinstance(timing, dict) and all(isinstance(timing.get(k), (int, float)) for k in ("onnx", "torch"))
    return timing if ok else None


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


def _cpu_name() -> str:
    """The CPU's model name (a cache shared across machines keeps one timing per CPU)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


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
                note: Callable[[str], None]) -> TorchEngine | OnnxEngine:
    """The engine `name` (auto, torch or onnx) for `model` on `device`."""
    if name not in ENGINES:
        raise InputError(f"takes {', '.join(ENGINES)}, got {name!r}", param="engine")
    if name == "torch" or (name == "auto" and device.type != "cpu"):
        return TorchEngine(model)
    if device.type != "cpu":
        raise InputError(f"onnx runs on the CPU; the device is {device}", param="engine")
    missing = onnx_available()
    if missing is not None:
        if name == "onnx":
            raise InputError(f"onnx needs {missing}", param="engine")
        note(f"ONNX Runtime may run this model faster on the CPU: {missing}")
        return TorchEngine(model)
    return OnnxEngine(model, identity, threads, note, choose=name == "auto")
