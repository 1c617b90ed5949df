"""`predict --dry-run`: what a job will do and how much memory it will take, without running it.

Peak memory is estimated from a formula (all sizes in bytes, B = batch, T = tile side,
C = classes, K = input bands):

    host = runtime + checkpoint + weights + gdal_cache + inputs + activations(cpu) + scores + stitcher
      runtime      interpreter, torch, GDAL, OpenCV once imported (RUNTIME_MIB, measured)
      checkpoint   the loaded state dict; weights: the float32 model built from it
      gdal_cache   GDAL_CACHEMAX (64 MiB, set by bigseg)
      inputs       2 x B x K x T^2 x 4 (the read batch and its normalised copy)
      activations  peak live tensor bytes of one forward pass of B tiles, traced on the meta
                   device (no memory, no compute); on the host only when the device is the CPU,
                   then x 1.35 (CPU_ACTIVATION_OVERHEAD: oneDNN scratch and allocator slack);
                   through an exported runtime (OpenVINO, ONNX Runtime) x its own overhead
                   instead plus exported: its library and its copy of the weights
                   (EXPORTED_MEMORY: overhead, MiB + weights)
      scores       with several scales or flips: 2 x B x C x T^2 x 4 (running sum + one
                   prediction); otherwise 0 (the batch's logits are the forward's last activation)
      stitcher     the streaming stitcher's largest held area x (C + 1) x 4, simulated on the grid;
                   on the host only when the device is the CPU (on a GPU the scores are blended
                   there, unless that would take over half its free memory)
      writer       the GeoTIFF writers' block rows in flight (`writer_rows`) x W x (1, + C + 1 with
                   probabilities): each block row is written once, when complete
    gpu  = CUDA_CONTEXT_MIB + weights (+ a half copy under autocast) + activations + inputs / 2 +
           scores + stitcher + lookahead (the next batch's scores, B x C x T^2 x 4, queued while
           the previous batch's results are written)

The predict benchmark (`benchmarks/predict_memory.py`) compares the estimate with the measured
peak RSS.
"""
from __future__ import annotations

import os
import time
import weakref
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_map

from bigseg.errors import describe_failure
from bigseg.infer.choose import MAX_PIXELS, warm_choice
from bigseg.tiling.geometry import TileGrid, stitcher_peak_pixels
from bigseg.io.gdal import gdal_env
from bigseg.io.outputs import describe
from bigseg.io.remote import is_remote
from bigseg.io.writers import BLOCK
from bigseg.models import create_model
from bigseg.infer.predictor import Predictor
from bigseg.run.discover import Failure, find_jobs
from bigseg.run.file_job import JobOptions
from bigseg.run.inputs import open_for_model

MIB = 2 ** 20
RUNTIME_MIB = 270       # python + torch + rasterio/GDAL + OpenCV + bigseg imported (measured, CPU build)
CUDA_CONTEXT_MIB = 600  # CUDA context and cuDNN/cuBLAS handles, outside torch's allocator
GDAL_CACHE_MIB = 64
# On the CPU, oneDNN scratch buffers and the allocator's slack come on top of the live tensors:
# 1.35 x the traced activations matches the measured peaks of a small and the full LDN121 (see
# benchmarks/predict_memory.py) to within 6%.
CPU_ACTIVATION_OVERHEAD = 1.35
# An exported runtime holds x OVERHEAD the traced activations plus its library and its own copy of
# the weights (MIB + weights), measured with benchmarks/predict_memory.py --engine NAME: ONNX
# Runtime's CPU arena extends in doubling chunks and keeps them (2.3 matched the small config at
# 0.93 and 1.00 at 5000 and 20000 px and LDN121 at 1.09 on 3000x3000); OpenVINO keeps more (3.0
# matched LDN121 on a 4000x4000 crop of the orthomosaic at 0.99: 3609 MiB measured, 1024-px tiles,
# batch 4; ONNX Runtime 2876 measured against 2947 estimated).
EXPORTED_MEMORY = {"onnx": (2.3, 60), "openvino": (3.0, 60)}


class _PeakTensorBytes(TorchDispatchMode):
    """Tracks the peak of live tensor bytes created inside the mode (meta tensors included)."""

    def __init__(self):
        super().__init__()
        self.live = self.peak = 0
        self._ids: set[int] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        tree_map(self._track, out)
        return out

    def _track(self, t):
        if isinstance(t, torch.Tensor) and id(t) not in self._ids:
            n = t.numel() * t.element_size()
            self._ids.add(id(t))
            self.live += n
            self.peak = max(self.peak, self.live)
            weakref.finalize(t, self._free, id(t), n)
        return t

    def _free(self, key: int, n: int) -> None:
        self.live -= n
        self._ids.discard(key)


def activation_bytes(checkpoint, batch: int, height: int, width: int, dtype: torch.dtype = torch.float32) -> int:
    """Peak live activation bytes of one inference forward pass, traced on the meta device."""
    with torch.device("meta"):
        model = create_model(checkpoint.arch, checkpoint.num_classes, checkpoint.in_channels, **checkpoint.config)
    model = model.eval().to(dtype)
    x = torch.zeros(batch, checkpoint.in_channels, height, width, device="meta", dtype=dtype)
    tracker = _PeakTensorBytes()
    with torch.inference_mode(), tracker:
        model(x)
    return tracker.peak


@dataclass
class Plan:
    input: str
    output: str
    width: int
    height: int
    bands: int
    dtype: str
    reader: str
    tiles: int
    tile_rows: int
    tile_cols: int
    batches: int
    tile: int
    overlap: int
    overlap_from: str
    blend: str
    device: str
    precision: str
    outputs: list[dict] = field(default_factory=list)
    memory_mib: dict = field(default_factory=dict)
    estimate_seconds: float | None = None
    notes: list[str] = field(default_factory=list)
    model: str = ""  # the weights the run will use (where a name resolved to)
    engine: str = ""  # the engine and precision the run will use

    def to_dict(self) -> dict:
        return asdict(self)


def writer_rows(grid: TileGrid, block: int = BLOCK) -> int:
    """The most image rows a GeoTIFF writer holds: while tile row i is stitched, the rows it
    finalises (from the previous tile row's frontier to the next tile row's start) arrive, and
    every block row they touch is held until complete."""
    frontiers = grid.row_starts[1:] + [grid.height]
    previous, peak = 0, 0
    for f in frontiers:
        peak = max(peak, (-(-f // block) - previous // block) * block)
        previous = f
    return min(peak, grid.height)


def memory_estimate(predictor: Predictor, width: int, height: int, bands: int, probs: bool = False) -> dict:
    """The formula of the module docstring, in MiB per term, with `host` and `gpu` totals."""
    engine = predictor.engine  # a dry run's: torch, which has the checkpoint
    ckpt = engine.checkpoint
    th, tw = min(predictor.tile, height), min(predictor.tile, width)
    grid = predictor.grid(width, height)
    b = min(predictor.batch_size, len(grid))
    c = ckpt.num_classes
    params = sum(v.numel() for v in ckpt.state_dict.values() if v.is_floating_point())
    stored = sum(v.numel() * v.element_size() for v in ckpt.state_dict.values())
    on_gpu = predictor.on_gpu
    blend_on_gpu = on_gpu and engine.blends_on_device(grid)
    dtype = engine.dtype if on_gpu else torch.float32
    scale_max = max(predictor.scales)
    act_h, act_w = max(1, round(th * scale_max)), max(1, round(tw * scale_max))
    act = activation_bytes(ckpt, b, act_h, act_w, dtype)
    runtime = None if on_gpu else engine.expected_runtime((act_h, act_w))
    exported = runtime is not None
    overhead, runtime_mib = EXPORTED_MEMORY.get(runtime, (CPU_ACTIVATION_OVERHEAD, 0))
    inputs = 2 * b * bands * th * tw * 4
    # one forward's output is the last live activation (counted there); averaging over scales,
    # flips or turns keeps a running sum and one prediction beside it
    scores = 2 * b * c * th * tw * 4 if predictor.averages_probabilities else 0
    stitcher = stitcher_peak_pixels(grid) * (c + 1) * 4
    writer = writer_rows(grid) * width * (1 + (c + 1 if probs else 0))
    terms = {"runtime": RUNTIME_MIB, "checkpoint": stored / MIB, "weights": params * 4 / MIB,
             "gdal_cache": GDAL_CACHE_MIB, "inputs": inputs / MIB,
             "activations": 0.0 if on_gpu else overhead * act / MIB,
             "exported": runtime_mib + params * 4 / MIB if exported else 0.0,
             "scores": 0.0 if on_gpu else scores / MIB, "stitcher": 0.0 if blend_on_gpu else stitcher / MIB,
             "writer": writer / MIB}
    out = {k: round(v, 1) for k, v in terms.items()}
    out["host"] = round(sum(terms.values()), 1)
    if on_gpu:
        half = params * 2 if dtype is not torch.float32 else 0
        lookahead = b * c * th * tw * 4
        on_device = stitcher if blend_on_gpu else 0
        gpu = CUDA_CONTEXT_MIB * MIB + params * 4 + half + act + inputs / 2 + scores + on_device + lookahead
        out["gpu_activations"] = round(act / MIB, 1)
        out["gpu_stitcher"] = round(on_device / MIB, 1)
        out["gpu"] = round(gpu / MIB, 1)
    else:
        out["gpu"] = None
    return out


def plan_file(predictor: Predictor, src: Path, dst: Path, options: JobOptions, estimate: bool = False) -> Plan:
    """Open `src` (metadata and the rescale statistics only) and describe the job."""
    with gdal_env(options.threads_for(predictor.on_gpu), remote=is_remote(src)), \
            open_for_model(src, predictor.card, options.read) as reader:
        grid = predictor.grid(reader.width, reader.height)
        out_size = _output_size(reader, options)
        plan = Plan(
            input=str(src), output=str(dst), width=reader.width, height=reader.height,
            bands=predictor.card.in_channels, dtype=str(getattr(reader, "dtype", "uint8")),
            reader=type(reader).__name__, tiles=len(grid), tile_rows=len(grid.row_starts),
            tile_cols=len(grid.col_starts), batches=-(-len(grid) // predictor.batch_size),
            tile=predictor.tile, overlap=predictor.overlap, overlap_from=predictor.overlap_from,
            blend=f"sin^2 ramp, zero weight within {predictor.overlap // 4} px of inner tile edges",
            device=predictor.device, precision=predictor.precision,
            notes=list(reader.notes),
            outputs=describe(dst, reader.kind, *out_size, predictor.num_classes, options.write))
        plan.memory_mib = memory_estimate(predictor, reader.width, reader.height, plan.bands, options.write.probs)
        plan.model = predictor.card.source
        plan.engine = describe_engine(predictor, (min(predictor.tile, reader.height), min(predictor.tile, reader.width)),
                                      (reader.width, reader.height))
        plan.notes += memory_warnings(plan.memory_mib, predictor.device)
        if estimate:
            plan.estimate_seconds = _time_estimate(predictor, reader, grid)
    return plan


def _output_size(reader, options: JobOptions) -> tuple[int, int]:
    """The outputs' width and height: the input's grid when a job read at the model's pixel size
    writes back on it (`bigseg.run.regrid`), else the grid predicted on."""
    if not reader.resampled or options.read.output_grid != "input":
        return reader.width, reader.height
    width, height = reader.native_size
    reader.notes.append(f"outputs on the input's grid, {width}x{height}")
    return width, height


def describe_engine(predictor: Predictor, shape: tuple[int, int], image: tuple[int, int] | None = None) -> str:
    """The engine and precision a run will use, and why, in words (`auto`: what it knows before
    running: timed here, exported but not timed, to be exported, or torch); with the image's
    (width, height) `image`, whether it starts without torch (`bigseg.infer.choose.warm_start`)."""
    precision = predictor.precision
    if predictor.engine.name == "torch":
        return f"torch ({precision})"
    engine = predictor.engine.model  # the exported runtimes inside the torch run
    in_runtime = lambda r: f"{r} ({engine.precision if r == 'openvino' else 'float32'})"
    padded = engine.padded(shape)
    failed = engine.failure(padded)
    if failed is not None:
        if not engine.choose:
            return f"{engine.name}: cannot run this model ({failed}); the run will stop with an error"
        return f"torch ({precision}): the model does not export ({failed}) (auto)"
    if not engine.choose:
        return in_runtime(engine.name)
    exported = engine.cache.path(padded).is_file()
    runtime = engine.expected_runtime(shape)
    timing = engine.cache.timing(padded, engine.machine, engine.runtimes)
    if timing is not None:
        times = ", ".join(f"{k} {v:.2f} s" for k, v in timing.items())
        plain = not predictor.averages_probabilities
        small = image is not None and image[0] * image[1] <= MAX_PIXELS
        warm = warm_choice(timing, padded, len(predictor.grid(*image))) if plain and small else None
        if warm is not None:
            return (f"{in_runtime(warm)}, without torch (a warm start: its runtime gives the faster command "
                    f"here; {times} a tile) (auto)")
        chosen = f"torch ({precision})" if runtime is None else in_runtime(runtime)
        return f"{chosen}: fastest here on these tiles, timed on this machine ({times} a tile) (auto)"
    if exported:
        return f"{in_runtime(runtime or engine.runtimes[0])} or torch: exported, not timed here yet; " \
               f"timed at the first batch, a few seconds (auto)"
    if engine.export_after <= 0:
        return (f"exported for {', '.join(engine.runtimes)} at the first batch (once, tens of seconds), timed, "
                f"then the fastest of them and torch; later runs of this size start at once (auto)")
    return (f"torch ({precision}) at first, then whichever of {', '.join(engine.runtimes)} and torch is fastest "
            f"here once torch has spent an export's cost on these tiles (auto)")


def memory_warnings(memory_mib: dict, device: str) -> list[str]:
    """A note for each estimate beyond the machine: host memory, and the GPU's."""
    notes = []
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / MIB
    except (ValueError, OSError, AttributeError):  # not a POSIX system: nothing to compare with
        total = None
    if total and memory_mib["host"] > total:
        notes.append(f"needs about {memory_mib['host'] / 1024:.1f} GiB of memory and this machine has "
                     f"{total / 1024:.1f} GiB: use a smaller --tile or --batch-size")
    if memory_mib.get("gpu") and device.startswith("cuda"):
        gpu_total = torch.cuda.get_device_properties(device).total_memory / MIB
        if memory_mib["gpu"] > gpu_total:
            notes.append(f"needs about {memory_mib['gpu'] / 1024:.1f} GiB on the GPU, which has "
                         f"{gpu_total / 1024:.1f} GiB: the run will back off to smaller batches or sub-tiles")
    return notes


def dry_run(predictor: Predictor, inputs: list[str], out: Path | None, *, recursive: bool = False,
            options: JobOptions = JobOptions(), estimate: bool = False) -> tuple[list[Plan], list[Failure]]:
    """The plan of every job without running the model (except a short timed warm-up with
    `estimate`); unreadable inputs are failures, as in a real run."""
    found = find_jobs(inputs, out, recursive, options.read.asset)
    failed = found.failed
    plans = []
    for job in found.jobs:
        try:
            plans.append(plan_file(predictor, job.input, job.output, options, estimate))
        except Exception as e:  # as in a real run: the file fails alone, in one line
            text = describe_failure(e)
            failed.append(Failure(str(job.input), text if job.input.name in text else f"{job.input}: {text}"))
    return plans, failed


def _time_estimate(predictor: Predictor, reader, grid: TileGrid, warmup: int = 1, measured: int = 2) -> float:
    """Time a few real batches of the first tiles (reading + inference) and scale to the grid."""
    windows = list(grid)
    b = predictor.batch_size
    batches = [windows[i:i + b] for i in range(0, min(len(windows), (warmup + measured) * b), b)]
    fill = predictor.fill
    timed, tiles = 0.0, 0
    for k, batch in enumerate(batches):
        t0 = time.perf_counter()
        data = []
        for w in batch:
            x, valid = reader.read(w)
            data.append(np.where(valid, x, fill).astype(np.float32))
        shapes = {d.shape for d in data}
        if len(shapes) == 1:
            predictor.predict(np.stack(data))
        if k >= warmup or len(batches) <= warmup:
            timed += time.perf_counter() - t0
            tiles += len(batch)
    return round(timed / max(tiles, 1) * len(windows), 1)
