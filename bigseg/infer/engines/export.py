"""The model exported to ONNX for the exported runtimes, and the cache that keeps the exports.

One export per padded tile shape (torch's exporter, fp32, batch left dynamic), kept in the user's
cache folder under a key of everything that shapes it (`bigseg.infer.cache.export_key`), written
atomically and readable by others (a shared cache); OpenVINO keeps its compiled blobs beside them
(`openvino/`). Beside each export its record holds its sha256 and, per machine, the timing of one
tile in each engine (`auto` chooses by it); a failed export is recorded with the versions that
failed (tried again after an upgrade); `auto` keeps the torch seconds spent on a shape not yet
exported (separate runs add up). A fresh export is checked against torch on a random batch before
use; an entry whose sha256 does not match is exported again, never trusted blindly.
"""
from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import tempfile
import time
import warnings
from pathlib import Path
from typing import Callable

import numpy as np

from bigseg.atomic import remove, write_text
from bigseg.infer.cache import OPSET, cache_dir, export_key, runtime_versions
from bigseg.infer.choose import recorded_timing
from bigseg.infer.engines.openvino import shareable
from bigseg.manifest import sha256

MAX_BATCH = 4096
STALE_SECONDS = 3600  # a temporary export file this old belongs to no running export
CHECK_TOLERANCE = 1e-3  # relative to the logits' range: a fresh export must match torch this well

Shape = tuple[int, int]


class ExportCache:
    """One model's entries in the export cache (no torch): `identity` is what identifies its
    weights and architecture, `bands` its input bands."""

    def __init__(self, identity: dict, bands: int, folder: Path | None = None):
        self.identity, self.bands = identity, bands
        self.folder = (folder or cache_dir()) / "onnx"
        self.compiled = (folder or cache_dir()) / "openvino"  # OpenVINO's compiled blobs

    def key(self, shape: Shape) -> str:
        return export_key(self.identity, shape, self.bands)

    def path(self, shape: Shape) -> Path:
        return self.folder / f"{self.key(shape)}.onnx"

    def record(self, shape: Shape) -> Path:
        return self.folder / f"{self.key(shape)}.json"

    def intact(self, shape: Shape) -> bool:
        """Whether the export's file matches the sha256 its record holds."""
        try:
            recorded = json.loads(self.record(shape).read_text())["sha256"]
        except (OSError, ValueError, KeyError):
            recorded = None
        return recorded == sha256(self.path(shape))

    def failure(self, shape: Shape) -> str | None:
        """Why an earlier export of `shape` failed, if it failed with the runtimes installed now."""
        try:
            record = json.loads(self._failure_path(shape).read_text())
        except (OSError, ValueError):
            return None
        if not isinstance(record, dict) or record.get("versions") != runtime_versions():
            return None
        return str(record.get("reason") or "unknown reason")

    def record_failure(self, shape: Shape, reason: str) -> None:
        with contextlib.suppress(OSError):  # later runs with these versions do not try again
            write_text(self._failure_path(shape), json.dumps({"reason": reason, "versions": runtime_versions()}))

    def _failure_path(self, shape: Shape) -> Path:
        return self.folder / f"{self.key(shape)}.failed.json"

    def torch_seconds(self, shape: Shape) -> float:
        """Torch seconds earlier runs spent on `shape` without exporting it."""
        try:
            return max(0.0, float(self._rent_path(shape).read_text()))
        except (OSError, ValueError):
            return 0.0

    def save_torch_seconds(self, shape: Shape, seconds: float) -> None:
        with contextlib.suppress(OSError):  # a read-only cache only forgets the time spent
            self.folder.mkdir(parents=True, exist_ok=True)
            write_text(self._rent_path(shape), f"{seconds:.3f}")

    def _rent_path(self, shape: Shape) -> Path:
        return self.folder / f"{self.key(shape)}.torch-seconds"

    def timing(self, shape: Shape, machine: str, runtimes: tuple[str, ...]) -> dict | None:
        """This machine's recorded timing of `shape` (seconds a tile per engine)."""
        return recorded_timing(self.record(shape), machine, runtimes)

    def recorded_timing(self, shape: Shape, machine: str):
        """This machine's timing in the record as it is (None: no record or no timing)."""
        try:
            return json.loads(self.record(shape).read_text()).get("timings", {}).get(machine)
        except (OSError, ValueError, AttributeError):
            return None

    def save_timing(self, shape: Shape, machine: str, timing: dict) -> None:
        with contextlib.suppress(OSError, ValueError):  # kept with the entry it was measured on
            record = json.loads(self.record(shape).read_text())
            record.setdefault("timings", {})[machine] = timing
            write_text(self.record(shape), json.dumps(record, default=str))

    def export_seconds(self) -> float | None:
        """How long the last export took here."""
        try:
            return float((self.folder / "export-seconds").read_text())
        except (OSError, ValueError):
            return None

    def commit(self, tmp: Path, shape: Shape, facts: dict, seconds: float) -> Path:
        """Put a checked export in place with its record."""
        path = self.path(shape)
        shareable(tmp)
        os.replace(tmp, path)
        write_text(self.record(shape), json.dumps({**self.identity, "shape": shape, "bands": self.bands,
                                                   "opset": OPSET, **facts, "sha256": sha256(path)}, default=str))
        shareable(self.record(shape))
        remove(self._rent_path(shape))  # exported: the time spent in torch no longer matters
        with contextlib.suppress(OSError):
            write_text(self.folder / "export-seconds", f"{seconds:.1f}")
        return path

    def temporary(self, shape: Shape) -> Path:
        """A fresh temporary file for an export of `shape` (stale ones of killed exports removed)."""
        self.folder.mkdir(parents=True, exist_ok=True)
        for stale in self.folder.glob(".*.onnx"):
            with contextlib.suppress(OSError):
                if time.time() - stale.stat().st_mtime > STALE_SECONDS:
                    remove(stale)
        fd, name = tempfile.mkstemp(dir=self.folder, prefix=f".{self.key(shape)}.", suffix=".onnx")
        os.close(fd)
        return Path(name)


def export(model, cache: ExportCache, shape: Shape, check: Callable[[Path], Callable]) -> Path:
    """Export `model` (a torch module) for tiles of `shape`, check it against torch on a random
    batch through the runtime `check` opens, and commit it to `cache`."""
    import torch
    from torch.export import Dim

    start = time.perf_counter()
    example = torch.randn(2, cache.bands, *shape, generator=torch.Generator().manual_seed(0))
    tmp = cache.temporary(shape)
    try:
        # the predictor calls engines inside its bf16 autocast: the export is always the fp32 graph,
        # which OpenVINO then runs at its inference precision (bf16 where the CPU has the units)
        with _quiet(), torch.autocast("cpu", enabled=False):
            program = torch.onnx.export(model, (example,), dynamo=True, opset_version=OPSET, input_names=["x"],
                                        output_names=["logits"], external_data=False,
                                        dynamic_shapes=({0: Dim("batch", min=1, max=MAX_BATCH)},))
            program.save(str(tmp), external_data=False)
        with torch.inference_mode(), torch.autocast("cpu", enabled=False):
            expected = model(example).float().numpy()
        got = check(tmp)(example.numpy())
        scale = max(float(np.abs(expected).max()), 1e-6)
        if got.shape != expected.shape or float(np.abs(got - expected).max()) > CHECK_TOLERANCE * scale:
            raise ValueError("its outputs differ from torch's")
        return cache.commit(tmp, shape, {"torch": torch.__version__}, time.perf_counter() - start)
    finally:
        remove(tmp)


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
