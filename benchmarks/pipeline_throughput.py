"""Throughput of `bigseg predict` against the model's own ceiling and a naive tiler, in one run.

(a) bare model: batched forward passes on synthetic tensors already on the device (the ceiling);
(b) end to end: `Segmenter.predict_file` on a synthetic GeoTIFF (and `--ortho FILE`): reading,
    inference, stitching, compression and writing included;
(c) naive tiler: the whole image read into memory, one tile at a time, no blending, each tile's
    labels written to the GeoTIFF as soon as it is done;
(d) reading alone: every tile of the grid read and decoded, with 1 and with `--io-threads` GDAL
    threads (what the reading thread can feed a fast GPU).
Throughput is input megapixels per second; "tile MP/s" counts the pixels the model ran on (tiles
overlap), so (b)'s tile MP/s over (a) is the pipeline's efficiency. Also printed: peak GPU memory,
peak RSS, multiply-adds per megapixel and the achieved fraction of the device's bf16 rate.

With `--agreement` (a GPU and trained weights, e.g. `--model ladder-dn121-camvid`): the share of
pixels whose label is the same in bf16 as in fp32, on every input.

    python benchmarks/pipeline_throughput.py --device cpu --model small --tile 512 --size 3000
    python benchmarks/pipeline_throughput.py --device cuda --model ladder-dn121-camvid --tile 1024 \\
        --size 12000 --ortho ../shared/data/ortho/yb_z21_epsg3857_jpeg_mask.tif --peak-tflops 989 --agreement
"""
from __future__ import annotations

import argparse
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from predict_memory import SMALL, make_raster  # noqa: E402

from bigseg.checkpoint import from_model  # noqa: E402
from bigseg.device import resolve_precision  # noqa: E402
from bigseg.inference import ReadOptions, Segmenter, WriteOptions  # noqa: E402
from bigseg.models import create_model  # noqa: E402
from bigseg.models.complexity import count_macs  # noqa: E402
from bigseg.tiling import TileGrid  # noqa: E402

CLASSES = 11


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bare(seg: Segmenter, batches: int) -> float:
    """Tile MP/s of the model alone: normalised synthetic batches already on the device."""
    b, t = seg.batch_size, seg.tile
    x = torch.randn(b, 3, t, t, device=seg.device)
    if seg.device.type == "cuda":
        x = x.contiguous(memory_format=torch.channels_last)
    auto = torch.autocast(seg.device.type, dtype=seg.dtype, enabled=seg.dtype is not torch.float32)
    with torch.inference_mode(), auto:
        for _ in range(2):
            seg.model(x)
        sync(seg.device)
        t0 = time.perf_counter()
        for _ in range(batches):
            seg.model(x)
        sync(seg.device)
    return batches * b * t * t / 1e6 / (time.perf_counter() - t0)


def end_to_end(seg: Segmenter, src: Path, dst: Path) -> tuple[float, float]:
    warm = np.zeros((seg.batch_size, 3, seg.tile, seg.tile), np.float32)
    seg.tile_scores(warm)  # autotuning and compilation outside the timing
    sync(seg.device)
    t0 = time.perf_counter()
    result = seg.predict_file(src, dst, ReadOptions(), WriteOptions())
    seconds = time.perf_counter() - t0
    grid = seg.grid(result.width, result.height)
    th, tw = grid.tile_shape
    return result.megapixels / seconds, len(grid) * th * tw / 1e6 / seconds


def naive(seg: Segmenter, src: Path, dst: Path) -> float:
    """One tile at a time over the whole image in memory; labels of each tile's core written at once."""
    import rasterio
    from rasterio.windows import Window as RWindow

    t0 = time.perf_counter()
    with rasterio.open(src) as ds:
        image = ds.read().astype(np.float32)
        profile = dict(driver="GTiff", width=ds.width, height=ds.height, count=1, dtype="uint8", crs=ds.crs,
                       transform=ds.transform, tiled=True, blockxsize=512, blockysize=512, compress="deflate")
    grid = TileGrid(image.shape[2], image.shape[1], seg.tile, seg.overlap)
    with rasterio.open(dst, "w", **profile) as out:
        for w in grid:
            scores = seg._tile_scores(image[None, :, w.row_off:w.row_end, w.col_off:w.col_end]).cpu().numpy()
            out.write(scores[0].argmax(0).astype(np.uint8)[None], window=RWindow(w.col_off, w.row_off, w.width, w.height))
    return image.shape[1] * image.shape[2] / 1e6 / (time.perf_counter() - t0)


def read_rate(seg: Segmenter, src: Path, threads: int) -> float:
    """Tile MP/s of reading (decoding, masks, rescaling) every tile of the grid, nothing else."""
    from bigseg.io.gdal import gdal_env
    from bigseg.io.readers import open_raster

    with gdal_env(threads), open_raster(src, seg.checkpoint.in_channels) as reader:
        grid = seg.grid(reader.width, reader.height)
        t0 = time.perf_counter()
        pixels = 0
        for w in grid:
            data, _ = reader.read(w)
            pixels += w.width * w.height
    return pixels / 1e6 / (time.perf_counter() - t0)


def checkpoint_for(spec: str):
    """`small` or an architecture name: random weights; otherwise a shipped model or a checkpoint."""
    from bigseg.checkpoint import resolve_model
    from bigseg.models import list_archs

    if spec == "small" or spec in {a.name for a in list_archs()}:
        torch.manual_seed(0)
        arch, config = ("ladder-dn121", SMALL) if spec == "small" else (spec, {})
        return from_model(create_model(arch, CLASSES, **config), arch, [f"c{i}" for i in range(CLASSES)])
    return resolve_model(spec)


def agreement(ckpt, args, src: Path, work: Path) -> float:
    """Share of valid pixels labelled alike by bf16 and fp32 predictions of `src` (same tiles)."""
    import rasterio

    masks = []
    for precision in ("fp32", "bf16"):
        seg = Segmenter(ckpt, args.device, precision, args.tile, None, args.batch)
        dst = work / f"agree_{precision}_{src.stem}.tif"
        seg.predict_file(src, dst)
        with rasterio.open(dst) as ds:
            masks.append(ds.read(1))
    valid = masks[0] != 255
    return float((masks[0] == masks[1])[valid].mean())


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--device", default="cpu")
    p.add_argument("--model", default="small", help="small (a little ladder config), an architecture name "
                   "(random weights), a shipped model name or a checkpoint")
    p.add_argument("--tile", type=int, default=512)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--precision", default="auto")
    p.add_argument("--size", type=int, default=3000, help="side of the synthetic GeoTIFF")
    p.add_argument("--ortho", type=Path, default=None)
    p.add_argument("--bare-batches", type=int, default=5)
    p.add_argument("--compile", action="store_true")
    p.add_argument("--io-threads", type=int, default=None, help="GDAL threads (default: the predictor's)")
    p.add_argument("--peak-tflops", type=float, default=None, help="the device's dense bf16 rate, for the fraction")
    p.add_argument("--work", type=Path, default=None)
    p.add_argument("--agreement", action="store_true", help="also compare bf16 with fp32 labels (trained weights)")
    args = p.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="bigseg-pipe-"))
    work.mkdir(parents=True, exist_ok=True)
    ckpt = checkpoint_for(args.model)
    seg = Segmenter(ckpt, args.device, args.precision, args.tile, None, args.batch, compile=args.compile,
                    io_threads=args.io_threads)
    args.io_threads = args.io_threads or max(2, seg.io_threads)
    src = work / f"synthetic_{args.size}.tif"
    if not src.exists():
        make_raster(src, args.size)
    macs_per_mp = count_macs(ckpt.build_model(), args.tile, args.tile) / (args.tile ** 2 / 1e6)
    dtype = resolve_precision(args.precision, seg.device)
    print(f"device {seg.device}, model {args.model}, tile {args.tile}, overlap {seg.overlap}, batch {args.batch}, "
          f"precision {str(dtype).removeprefix('torch.')}, {macs_per_mp / 1e9:.1f} GMACs per MP")
    ceiling = bare(seg, args.bare_batches)
    print(f"(a) bare model        {ceiling:8.2f} tile MP/s")
    rows = []
    for label, path in [(f"synthetic {args.size}^2", src)] + ([("ortho", args.ortho)] if args.ortho else []):
        if seg.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(seg.device)
        mp, tile_mp = end_to_end(seg, path, work / f"e2e_{path.stem}.tif")
        gpu = torch.cuda.max_memory_allocated(seg.device) / 2 ** 20 if seg.device.type == "cuda" else float("nan")
        slow = naive(seg, path, work / f"naive_{path.stem}.tif")
        rows.append((label, mp, tile_mp, slow, gpu))
        print(f"(b) end to end {label:<14} {mp:8.2f} MP/s ({tile_mp:.2f} tile MP/s, {tile_mp / ceiling:.2f} of (a)); "
              f"peak GPU {gpu:.0f} MiB")
        print(f"(c) naive tiler {label:<13} {slow:8.2f} MP/s; (b)/(c) = {mp / slow:.2f}")
        one, many = read_rate(seg, path, 1), read_rate(seg, path, args.io_threads)
        print(f"(d) reading alone {label:<11} {one:8.2f} tile MP/s with 1 GDAL thread, {many:.2f} with "
              f"{args.io_threads} ({many / one:.2f}x)")
    if args.agreement:
        for label, path in [(f"synthetic {args.size}^2", src)] + ([("ortho", args.ortho)] if args.ortho else []):
            share = agreement(ckpt, args, path, work)
            print(f"bf16 vs fp32 labels, {label}: {share:.4%} of valid pixels agree (goal >= 99.5%)")
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"peak RSS {rss:.0f} MiB (whole benchmark process, naive tiler's full image included)")
    if args.peak_tflops:
        achieved = 2 * macs_per_mp * ceiling / 1e12
        print(f"bare model: {achieved:.1f} TFLOP/s = {achieved / args.peak_tflops:.1%} of {args.peak_tflops:.0f}")


if __name__ == "__main__":
    main()
