"""Throughput of `bigseg predict` against the device's ceiling, the bare model per engine, a naive
tiler and MONAI's sliding window, in one run.

(0) ceiling (CPU): fp32 4096x4096 matmuls in torch and numpy, the faster's GFLOP per CPU-second
    (all threads counted);
(a) bare model per engine and precision (`--engines torch,torch:bf16,openvino:f32,openvino:bf16,
    onnxruntime`; onnxruntime is ONNX Runtime on the same cached export,
    when installed): batches of normalised tiles, no reading or writing; MP/s, CPU seconds per
    megapixel and the achieved GFLOP per CPU-second as a share of (0);
(b) end to end per engine: `predict_file` on a synthetic GeoTIFF and (`--ortho FILE`) a crop of
    it (`--crop`, default 3000): reading, inference, stitching, compression and writing;
(c) naive tiler: the whole image in memory, one tile at a time, no blending, torch;
(d) MONAI's `sliding_window_inference` with the same model (torch), tile, overlap and batch,
    Gaussian blending, the whole image and its logits in memory (monai in the benchmark's own
    requirements: `pip install monai`);
(e) `--before CHECKOUT`: the same `bigseg predict` command run from another checkout (a baseline);
(f) `--rss-crops 3000,6000`: peak RSS of `bigseg predict` per engine on crops of those sizes;
(g) reading alone with 1 and `--io-threads` GDAL threads; with `--agreement` (trained weights)
    bf16 against fp32 labels;
(h) `--startup IMAGE`: where a small image's `bigseg predict` spends its seconds in a fresh process
    (imports, checkpoint, engine set-up, first batch, writing), and the whole command's wall time
    per engine, warm (its second run).
Megapixels count input pixels; "tile MP/s" counts what the model ran on (tiles overlap).

    python benchmarks/pipeline_throughput.py --device cpu --model ladder-dn121-camvid --tile 1024 \\
        --batch 4 --size 3000 --ortho ../shared/data/ortho/yb_z21_epsg3857_jpeg_mask.tif --monai \\
        --engines torch,openvino:f32,openvino:bf16,onnxruntime --startup examples/street.jpg
    python benchmarks/pipeline_throughput.py --device cuda --model ladder-dn121-camvid --tile 1024 \\
        --size 12000 --ortho ../shared/data/ortho/yb_z21_epsg3857_jpeg_mask.tif --peak-tflops 989 --agreement
"""
from __future__ import annotations

import argparse
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from predict_memory import SMALL, make_raster, peak_rss_mb

from bigseg.checkpoint import from_model, resolve_model, save_checkpoint
from bigseg.infer.engines.torch import resolve_precision
from bigseg.tiling.geometry import TileGrid
from bigseg.models import create_model, list_archs
from bigseg.models.complexity import count_macs
from bigseg.infer.predictor import Predictor
from bigseg.run.file_job import JobOptions, predict_file
from bigseg.runtime import keep_freed_memory

CLASSES = 11


def cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_ceiling(n: int = 4096, repeats: int = 6) -> dict[str, tuple[float, float]]:
    """GFLOP per CPU-second and per wall-second of fp32 n x n matmuls, through torch (MKL or
    oneDNN) and numpy (OpenBLAS): on some CPUs one library is well ahead of the other."""
    rates = {}
    for name, make in (("torch", lambda: torch.randn(n, n)), ("numpy", lambda: np.random.rand(n, n).astype(np.float32))):
        a, b = make(), make()
        a @ b
        c0, t0 = cpu_seconds(), time.perf_counter()
        for _ in range(repeats):
            a @ b
        flop = 2 * n ** 3 * repeats / 1e9
        rates[name] = (flop / (cpu_seconds() - c0), flop / (time.perf_counter() - t0))
    return rates


class OnnxRuntime:
    """ONNX Runtime's CPU provider on the ONNX file OpenVINO's engine exported (the engine bigseg
    used before OpenVINO; here only as a baseline)."""

    name = "onnxruntime"

    def __init__(self, exported, threads: int):
        import onnxruntime as ort

        self.exported, self.threads, self.sessions, self.ort = exported, threads, {}, ort

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        shape = tuple(x.shape[-2:])
        if shape not in self.sessions:
            self.exported(x)  # exports (or finds) the ONNX file of this shape
            path = self.exported.folder / f"{self.exported.key(shape, int(x.shape[1]))}.onnx"
            options = self.ort.SessionOptions()
            options.intra_op_num_threads, options.inter_op_num_threads = self.threads, 1
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
            self.sessions[shape] = self.ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        return torch.from_numpy(self.sessions[shape].run(None, {"x": np.ascontiguousarray(x.float().numpy())})[0])


def make_predictor(ckpt, args, spec: str) -> Predictor:
    """`torch`, `torch:bf16`, `openvino[:f32|:bf16]` or `onnxruntime` as a predictor."""
    engine, _, precision = spec.partition(":")
    precision = {"f32": "fp32", "": args.precision}.get(precision, precision)
    if engine == "onnxruntime":
        pred = Predictor(ckpt, args.device, "fp32", args.tile, None, args.batch, engine="openvino")
        pred.engine = OnnxRuntime(pred.engine, torch.get_num_threads())
        return pred
    return Predictor(ckpt, args.device, precision, args.tile, None, args.batch, compile=args.compile, engine=engine)


def label_of(pred: Predictor) -> str:
    precision = getattr(pred.engine, "precision", None) or str(pred.dtype).removeprefix("torch.")
    return f"{pred.engine.name} {precision}".replace("float32", "f32").replace("bfloat16", "bf16")


def bare(pred: Predictor, batches: int) -> tuple[float, float]:
    """Tile MP/s and CPU s per tile MP of the engine alone on normalised batches on the device."""
    b, t = pred.batch_size, pred.tile
    x = torch.randn(b, 3, t, t, device=pred.device)
    if pred.device.type == "cuda":
        x = x.contiguous(memory_format=torch.channels_last)
    auto = torch.autocast(pred.device.type, dtype=pred.dtype, enabled=pred.dtype is not torch.float32)
    with torch.inference_mode(), auto:
        for _ in range(2):
            pred.engine(x)  # the first call of an exported engine exports (or loads) it
        sync(pred.device)
        c0, t0 = cpu_seconds(), time.perf_counter()
        for _ in range(batches):
            pred.engine(x)
        sync(pred.device)
        wall, cpu = time.perf_counter() - t0, cpu_seconds() - c0
    mp = batches * b * t * t / 1e6
    return mp / wall, cpu / mp


def end_to_end(pred: Predictor, src: Path, dst: Path, options: JobOptions) -> tuple[float, float, float]:
    """Input MP/s, tile MP/s and CPU s per input MP of one predict_file."""
    c0, t0 = cpu_seconds(), time.perf_counter()
    result = predict_file(pred, src, dst, options)
    wall, cpu = time.perf_counter() - t0, cpu_seconds() - c0
    grid = pred.grid(result.width, result.height)
    th, tw = grid.tile_shape
    return result.megapixels / wall, len(grid) * th * tw / 1e6 / wall, cpu / result.megapixels


def _read_whole(src: Path):
    import rasterio

    with rasterio.open(src) as ds:
        profile = dict(driver="GTiff", width=ds.width, height=ds.height, count=1, dtype="uint8", crs=ds.crs,
                       transform=ds.transform, tiled=True, blockxsize=512, blockysize=512, compress="deflate")
        return ds.read().astype(np.float32), profile


def naive(pred: Predictor, src: Path, dst: Path) -> float:
    """One tile at a time over the whole image in memory; labels of each tile written at once."""
    import rasterio
    from rasterio.windows import Window as RWindow

    t0 = time.perf_counter()
    image, profile = _read_whole(src)
    grid = TileGrid(image.shape[2], image.shape[1], pred.tile, pred.overlap)
    with rasterio.open(dst, "w", **profile) as out:
        for w in grid:
            scores = pred.forward(image[None, :, w.row_off:w.row_end, w.col_off:w.col_end]).cpu().numpy()
            out.write(scores[0].argmax(0).astype(np.uint8)[None], window=RWindow(w.col_off, w.row_off, w.width, w.height))
    return image.shape[1] * image.shape[2] / 1e6 / (time.perf_counter() - t0)


def monai_window(pred: Predictor, src: Path, dst: Path) -> tuple[float, float]:
    """MONAI's sliding window (Gaussian blend) with the same torch model: input MP/s, CPU s/MP."""
    import rasterio
    from monai.inferers import sliding_window_inference

    c0, t0 = cpu_seconds(), time.perf_counter()
    image, profile = _read_whole(src)
    x = (torch.from_numpy(image)[None] - pred._mean) / pred._std
    with torch.inference_mode():
        logits = sliding_window_inference(x, (pred.tile, pred.tile), pred.batch_size, pred.model,
                                          overlap=pred.overlap / pred.tile, mode="gaussian")
    with rasterio.open(dst, "w", **profile) as out:
        out.write(logits[0].argmax(0).to(torch.uint8).numpy()[None])
    mp = image.shape[1] * image.shape[2] / 1e6
    return mp / (time.perf_counter() - t0), (cpu_seconds() - c0) / mp


def cli_run(src: Path, dst: Path, model: str, args, engine: str, checkout: Path | None = None) -> tuple[float, float]:
    """Peak RSS (MiB) and seconds of `bigseg predict` in a fresh process (from `checkout` if given:
    run there, since `python -m` puts the working folder first on the path)."""
    env = {**os.environ, **({"PYTHONPATH": str(checkout)} if checkout else {})}
    env.pop("BIGSEG_ENGINE", None)
    cmd = [sys.executable, "-m", "bigseg", "predict", str(src), "-m", model, "-o", str(dst), "--overwrite",
           "--device", args.device, "--tile", str(args.tile), "--batch-size", str(args.batch), "--json"]
    if checkout is None:
        name, _, precision = engine.partition(":")
        if name == "onnxruntime":  # the baseline runtime is an engine of bigseg's own
            name = "onnx"
        cmd += ["--engine", name] + (["--precision", {"f32": "fp32"}.get(precision, precision)] if precision else [])
    rss, seconds, _ = peak_rss_mb(cmd, env, checkout)
    return rss, seconds


def crop(src: Path, side: int, dst: Path) -> Path:
    """A side x side crop from the middle of `src`, with its mask and georeference."""
    import rasterio
    from rasterio.windows import Window as RWindow

    if dst.exists():
        return dst
    with rasterio.open(src) as ds:
        w = RWindow(max(0, (ds.width - side) // 2), max(0, (ds.height - side) // 2), min(side, ds.width),
                    min(side, ds.height))
        profile = ds.profile.copy()
        profile.update(width=int(w.width), height=int(w.height), transform=ds.window_transform(w))
        with rasterio.Env(GDAL_TIFF_INTERNAL_MASK=True), rasterio.open(dst, "w", **profile) as out:
            out.write(ds.read(window=w))
            out.write_mask(ds.dataset_mask(window=w))
    return dst


def checkpoint_for(spec: str, work: Path):
    """`small` or an architecture name: random weights (saved for the CLI runs); otherwise a
    shipped model or a checkpoint."""
    if spec == "small" or spec in {a.name for a in list_archs()}:
        torch.manual_seed(0)
        arch, config = ("ladder-dn121", SMALL) if spec == "small" else (spec, {})
        ckpt = from_model(create_model(arch, CLASSES, **config), arch, [f"c{i}" for i in range(CLASSES)])
        return ckpt, str(save_checkpoint(ckpt, work / f"{spec}.pt"))
    return resolve_model(spec), spec


def agreement(ckpt, args, src: Path, work: Path) -> float:
    """Share of valid pixels labelled alike by bf16 and fp32 predictions of `src` (same tiles)."""
    import rasterio

    masks = []
    for precision in ("fp32", "bf16"):
        pred = Predictor(ckpt, args.device, precision, args.tile, None, args.batch, engine="torch")
        dst = work / f"agree_{precision}_{src.stem}.tif"
        predict_file(pred, src, dst)
        with rasterio.open(dst) as ds:
            masks.append(ds.read(1))
    valid = masks[0] != 255
    return float((masks[0] == masks[1])[valid].mean())


def read_rate(pred: Predictor, src: Path, threads: int) -> float:
    """Tile MP/s of reading (decoding, masks, rescaling) every tile of the grid, nothing else."""
    from bigseg.io.gdal import gdal_env
    from bigseg.io.readers import open_raster

    with gdal_env(threads), open_raster(src, pred.checkpoint.in_channels) as reader:
        grid = pred.grid(reader.width, reader.height)
        t0, pixels = time.perf_counter(), 0
        for w in grid:
            reader.read(w)
            pixels += w.width * w.height
    return pixels / 1e6 / (time.perf_counter() - t0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--model", default="small", help="small (a little ladder config), an architecture name "
                   "(random weights), a shipped model name or a checkpoint")
    p.add_argument("--engines", default="torch,openvino:f32,openvino:bf16",
                   help="engines[:precision] to compare (torch on a GPU), e.g. torch,openvino:f32,onnxruntime")
    p.add_argument("--startup", type=Path, default=None, help="a small image: where its predict's seconds go")
    p.add_argument("--tile", type=int, default=512)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--precision", default="auto")
    p.add_argument("--size", type=int, default=3000, help="side of the synthetic GeoTIFF")
    p.add_argument("--ortho", type=Path, default=None)
    p.add_argument("--crop", type=int, default=3000, help="side of the crop taken from --ortho")
    p.add_argument("--monai", action="store_true", help="also MONAI's sliding_window_inference")
    p.add_argument("--before", type=Path, default=None, help="a checkout whose `bigseg predict` is the baseline")
    p.add_argument("--rss-crops", default="", help="e.g. 3000,6000: peak RSS of predict per engine on such crops")
    p.add_argument("--bare-batches", type=int, default=3)
    p.add_argument("--compile", action="store_true")
    p.add_argument("--io-threads", type=int, default=None, help="GDAL threads (default: the job's)")
    p.add_argument("--peak-tflops", type=float, default=None, help="the device's dense bf16 rate, for the fraction")
    p.add_argument("--work", type=Path, default=None)
    p.add_argument("--agreement", action="store_true", help="also compare bf16 with fp32 labels (trained weights)")
    args = p.parse_args()
    if os.environ.get("BIGSEG_KEEP_FREED_MEMORY") == "1":  # as `bigseg predict` does then
        keep_freed_memory()
    work = (args.work or Path(tempfile.mkdtemp(prefix="bigseg-pipe-"))).resolve()
    work.mkdir(parents=True, exist_ok=True)
    ckpt, model_arg = checkpoint_for(args.model, work)
    engines = [e for e in args.engines.split(",") if e] if args.device == "cpu" else ["torch"]
    preds = {e: make_predictor(ckpt, args, e) for e in engines}
    first = preds[engines[0]]
    options = JobOptions(io_threads=args.io_threads)
    args.io_threads = args.io_threads or max(2, options.threads_for(first.device))
    macs_per_mp = count_macs(ckpt.build_model(), args.tile, args.tile) / (args.tile ** 2 / 1e6)
    dtype = resolve_precision(args.precision, first.device)
    print(f"device {first.device}, {torch.get_num_threads()} threads, model {args.model}, tile {args.tile}, "
          f"overlap {first.overlap}, batch {args.batch}, precision {str(dtype).removeprefix('torch.')}, "
          f"{2 * macs_per_mp / 1e9:.1f} GFLOP per MP")
    ceiling = None
    if first.device.type == "cpu":
        rates = matmul_ceiling()
        ceiling = max(cpu_rate for cpu_rate, _ in rates.values())
        print("(0) fp32 matmul ceiling: " + "; ".join(f"{name} {c:.0f} GFLOP per CPU-second ({w:.0f} per wall second)"
                                                      for name, (c, w) in rates.items()) + f"; ceiling {ceiling:.0f}")
    for engine, pred in preds.items():
        rate, cpu_per_mp = bare(pred, args.bare_batches)
        share = "" if ceiling is None else f", {2 * macs_per_mp / 1e9 / cpu_per_mp:.0f} GFLOP/CPU-s = " \
            f"{2 * macs_per_mp / 1e9 / cpu_per_mp / ceiling:.0%} of (0)"
        print(f"(a) bare model, {label_of(pred):<16} {rate:7.2f} tile MP/s, {cpu_per_mp:5.2f} CPU s/MP{share}",
              flush=True)
    inputs = [(f"synthetic {args.size}^2", work / f"synthetic_{args.size}.tif")]
    if not inputs[0][1].exists():
        make_raster(inputs[0][1], args.size)
    if args.ortho:
        inputs.append((f"ortho crop {args.crop}^2", crop(args.ortho, args.crop, work / f"ortho_{args.crop}.tif")))
    if args.device == "cpu":  # auto's one-time timing of the engines, so that runs below do not pay it
        auto = Predictor(ckpt, "cpu", args.precision, args.tile, None, args.batch, engine="auto", on_note=print)
        auto.predict(np.zeros((1, ckpt.in_channels, args.tile, args.tile), np.float32))
    for label, path in inputs:
        speeds = {}
        for engine, pred in preds.items():
            if pred.device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(pred.device)
            mp, tile_mp, cpu = end_to_end(pred, path, work / f"e2e_{engine}_{path.stem}.tif", options)
            speeds[engine] = mp
            gpu = f"; peak GPU {torch.cuda.max_memory_allocated(pred.device) / 2 ** 20:.0f} MiB" \
                if pred.device.type == "cuda" else ""
            print(f"(b) end to end, {label_of(pred):<16} {label}: {mp:6.3f} MP/s, {cpu:5.2f} CPU s/MP "
                  f"({tile_mp:.3f} tile MP/s){gpu}", flush=True)
        best = max(speeds.values())
        slow = naive(first, path, work / f"naive_{path.stem}.tif")
        print(f"(c) naive tiler (torch) {label}: {slow:6.3f} MP/s; best end to end / naive = {best / slow:.2f}", flush=True)
        if args.monai:
            rate, cpu = monai_window(preds.get("torch", first), path, work / f"monai_{path.stem}.tif")
            print(f"(d) MONAI sliding window (torch) {label}: {rate:6.3f} MP/s, {cpu:5.2f} CPU s/MP; "
                  f"best end to end / MONAI = {best / rate:.2f}", flush=True)
        if args.before:
            rss, seconds = cli_run(path, work / f"before_{path.stem}.tif", model_arg, args, "torch", args.before)
            mp = _megapixels(path) / seconds
            print(f"(e) `bigseg predict` of {args.before} {label}: {mp:6.3f} MP/s (whole command, {seconds:.1f} s, "
                  f"peak RSS {rss:.0f} MiB)", flush=True)
            for engine in [*preds, *(["auto"] if args.device == "cpu" else [])]:
                rss, seconds = cli_run(path, work / f"cli_{engine}_{path.stem}.tif", model_arg, args, engine)
                print(f"    `bigseg predict --engine {engine}` {label}: {_megapixels(path) / seconds:6.3f} MP/s "
                      f"({seconds:.1f} s, peak RSS {rss:.0f} MiB); {_megapixels(path) / mp / seconds:.2f}x the baseline's speed",
                      flush=True)
        one, many = read_rate(first, path, 1), read_rate(first, path, args.io_threads)
        print(f"(g) reading alone {label}: {one:.1f} tile MP/s with 1 GDAL thread, {many:.1f} with {args.io_threads}")
    for side in [int(s) for s in args.rss_crops.split(",") if s]:
        src = crop(args.ortho, side, work / f"ortho_{side}.tif") if args.ortho else work / f"synthetic_{side}.tif"
        if not src.exists():
            make_raster(src, side)
        for engine in preds:
            rss, seconds = cli_run(src, work / f"rss_{engine}_{side}.tif", model_arg, args, engine)
            print(f"(f) peak RSS, {engine:<5} {side}^2: {rss:.0f} MiB ({seconds:.1f} s)", flush=True)
    if args.startup:
        startup(args, model_arg)
    if args.agreement:
        for label, path in inputs:
            print(f"bf16 vs fp32 labels, {label}: {agreement(ckpt, args, path, work):.4%} of valid pixels agree")
    print(f"peak RSS of this process {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB "
          f"(the naive tiler's and MONAI's whole images included)")
    if args.peak_tflops and first.device.type == "cuda":
        rate, _ = bare(first, args.bare_batches)
        achieved = 2 * macs_per_mp * rate / 1e12
        print(f"bare model: {achieved:.1f} TFLOP/s = {achieved / args.peak_tflops:.1%} of {args.peak_tflops:.0f}")


STAGES = """
import sys, time, json
t0 = time.perf_counter(); marks = {}
def mark(name):
    marks[name] = round(time.perf_counter() - t0, 3)
import bigseg.cli; mark("import the CLI (no torch)")
import torch; from bigseg.infer.predictor import Predictor; from bigseg.run.file_job import predict_file; mark("import torch")
from bigseg.checkpoint import resolve_model; ckpt = resolve_model(sys.argv[2]); mark("checkpoint: sha256 and load")
pred = Predictor(ckpt, "cpu", "auto", tile=1024, engine=sys.argv[3]); pred.weights_digest; mark("model built, engine set up")
from pathlib import Path
result = predict_file(pred, Path(sys.argv[1]), Path(sys.argv[4])); mark("predicted and written (first batch)")
print(json.dumps(marks))
"""


def startup(args, model: str) -> None:
    """(h) A small image's predict: its stages in a fresh process, then the whole command per engine."""
    import subprocess

    for engine in ("torch", "openvino", "auto"):
        out = None
        for _ in range(2):  # the second run is the warm one (exports, compiled blobs and OS caches ready)
            done = subprocess.run([sys.executable, "-c", STAGES, str(args.startup), model, engine,
                                   str(Path(tempfile.mkdtemp()) / "s.png")], capture_output=True, text=True)
            out = done.stdout.strip().splitlines()[-1] if done.returncode == 0 else done.stderr[-300:]
        print(f"(h) start-up stages, {engine}: {out}", flush=True)
        walls = []
        for _ in range(2):
            t0 = time.perf_counter()
            subprocess.run([sys.executable, "-m", "bigseg", "predict", str(args.startup), "-m", model, "--device", "cpu",
                            "--engine", engine, "-o", str(Path(tempfile.mkdtemp()) / "s.png"), "-q"], check=True)
            walls.append(time.perf_counter() - t0)
        print(f"(h) `bigseg predict {args.startup.name} --engine {engine}`: {walls[0]:.2f} s wall, warm "
              f"{walls[1]:.2f} s", flush=True)


def _megapixels(path: Path) -> float:
    import rasterio

    with rasterio.open(path) as ds:
        return ds.width * ds.height / 1e6


if __name__ == "__main__":
    main()
