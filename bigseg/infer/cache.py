"""bigseg's cache folder and the keys of what it holds, without torch: a warm start finds its
exported model here before (or without) importing torch."""
from __future__ import annotations

import hashlib
import json
import os
import platform
import sys
from importlib import metadata
from pathlib import Path

OPSET = 18  # the ONNX opset of every export


def cache_dir() -> Path:
    """`$BIGSEG_CACHE`, else the platform's user cache folder (XDG on Linux)."""
    if os.environ.get("BIGSEG_CACHE"):
        return Path(os.environ["BIGSEG_CACHE"])
    if sys.platform == "darwin":
        return Path.home() / "Library" / "Caches" / "bigseg"
    if sys.platform == "win32":
        return Path(os.environ.get("LOCALAPPDATA", Path.home() / "AppData" / "Local")) / "bigseg" / "Cache"
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "bigseg"


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "none"


def export_key(identity: dict, shape: tuple[int, int], bands: int) -> str:
    """The cache key of a model's export for inputs of `shape`: everything that shapes it (the
    weights and architecture in `identity`, bands, shape, opset, the torch and exporter versions,
    read from the installed packages' metadata, not by importing them)."""
    facts = {**identity, "bands": bands, "shape": tuple(shape), "opset": OPSET, "torch": _version("torch"),
             "onnxscript": _version("onnxscript")}
    return hashlib.sha256(json.dumps(facts, sort_keys=True, default=str).encode()).hexdigest()[:32]


def runtime_versions() -> dict[str, str | None]:
    """The versions of what makes and runs an export: a failure recorded with other versions is retried."""
    return {name: _version(name) for name in ("torch", "onnxscript", "openvino", "onnxruntime")}


def _cpuinfo(field: str) -> str | None:
    """The first `field` line's value in /proc/cpuinfo (Linux), else None."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(field):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def cpu_name() -> str:
    """The CPU's model name (a cache shared across machines keeps one timing per CPU)."""
    return _cpuinfo("model name") or platform.processor() or platform.machine()


def native_bf16() -> bool:
    """Whether this CPU has bf16 units, decided as OpenVINO decides it: its CPU plugin lists BF16
    among the optimisation capabilities on CPUs with AMX or AVX-512 BF16 (bf16 is then about 2-5x
    fp32; elsewhere it is emulated and slower). Importing OpenVINO costs a third of a second, so
    the answer is kept in the cache folder per CPU model and OpenVINO version; without OpenVINO,
    the CPU's flags (amx_bf16, avx512_bf16) decide."""
    version = _version("openvino")
    if version == "none":
        return bool(_cpu_flags() & {"amx_bf16", "avx512_bf16"})
    record = cache_dir() / "cpu-capabilities.json"
    key = f"{cpu_name()} | openvino {version}"
    try:
        known = json.loads(record.read_text())
    except (OSError, ValueError):
        known = {}
    if not isinstance(known, dict) or not isinstance(known.get(key), list):
        known = {**(known if isinstance(known, dict) else {}), key: openvino_capabilities()}
        try:
            record.parent.mkdir(parents=True, exist_ok=True)
            tmp = record.with_name(f".{record.name}.{os.getpid()}")
            tmp.write_text(json.dumps(known))
            os.replace(tmp, record)
        except OSError:
            pass  # a read-only cache asks OpenVINO each time
    return "BF16" in known[key]


def openvino_capabilities() -> list[str]:
    """OpenVINO's optimisation capabilities of this CPU (e.g. BF16, FP32, INT8)."""
    import openvino as ov

    return [str(c) for c in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")]


def _cpu_flags() -> set[str]:
    return set((_cpuinfo("flags") or "").split())


def machine(threads: int, precision: str) -> str:
    """What an engine timing holds for: CPU model, threads, precision, allocator setting."""
    from bigseg.runtime import keeps_freed_memory

    return f"{cpu_name()}, {threads} threads, {precision}{', freed memory kept' if keeps_freed_memory() else ''}"


def default_threads() -> int:
    """The compute threads torch uses here by default, as the torch predictor recorded it (before
    torch is imported, the cache says), else the CPU count."""
    try:
        return max(1, int((cache_dir() / "threads").read_text()))
    except (OSError, ValueError):
        return os.cpu_count() or 1


def record_default_threads(threads: int) -> None:
    from bigseg.atomic import write_text

    try:
        if default_threads() != threads or not (cache_dir() / "threads").is_file():
            cache_dir().mkdir(parents=True, exist_ok=True)
            write_text(cache_dir() / "threads", str(threads))
    except OSError:
        pass
