"""How closely an exported engine, at each precision, follows torch fp32 on real images, as a user
sees the outputs.

Each input is predicted with `--probs` (same model, tiles, overlap and batch): once through torch
fp32 and once through each `--engines` entry (ENGINE:PRECISION, e.g. openvino:fp32,openvino:bf16).
Reported per input: the share of valid pixels whose label agrees, and the share of probability
samples (uint8, p x 255) within 1/255.

    python benchmarks/engine_agreement.py ../shared/data/cityscapes-sample/frames/frankfurt_*.png \\
        --ortho ../shared/data/ortho/yb_z21_epsg3857_jpeg_mask.tif --crop 3000 --engines openvino:fp32,openvino:bf16
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from pipeline_throughput import crop

from bigseg.checkpoint import resolve_model
from bigseg.io.outputs import WriteOptions
from bigseg.infer.predictor import Predictor
from bigseg.run.file_job import JobOptions, predict_file


def outputs(pred: Predictor, src: Path, dst: Path) -> tuple[np.ndarray, np.ndarray]:
    """(labels, uint8 probabilities) of `src` as `predict --probs` writes them (GeoTIFFs, also for
    PNG inputs: the destination's name chooses)."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    result = predict_file(pred, src, dst, JobOptions(write=WriteOptions(probs=True)))
    probs_path = next(p for p in result.extras if ".probs." in p.name)
    return _read(result.output), _read(probs_path)


def _read(path: Path) -> np.ndarray:
    import rasterio

    with rasterio.open(path) as ds:
        return ds.read(1) if ds.count == 1 else ds.read()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("inputs", nargs="*", type=Path)
    p.add_argument("--model", default="ladder-dn121-camvid")
    p.add_argument("--engines", default="openvino:fp32,openvino:bf16")
    p.add_argument("--tile", type=int, default=1024)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--ortho", type=Path, default=None)
    p.add_argument("--crop", type=int, default=3000)
    p.add_argument("--work", type=Path, default=None)
    args = p.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="bigseg-agree-"))
    work.mkdir(parents=True, exist_ok=True)
    inputs = list(args.inputs)
    if args.ortho:
        inputs.append(crop(args.ortho, args.crop, work / f"ortho_{args.crop}.tif"))
    ckpt = resolve_model(args.model)
    reference = Predictor(ckpt, "cpu", "fp32", args.tile, None, args.batch, engine="torch", on_note=print)
    expected = {src: outputs(reference, src, work / "torch" / f"{src.stem}.mask.tif") for src in inputs}
    for spec in [e for e in args.engines.split(",") if e]:
        engine, _, precision = spec.partition(":")
        pred = Predictor(ckpt, "cpu", precision or "fp32", args.tile, None, args.batch, engine=engine, on_note=print)
        name = f"{pred.engine.name} {getattr(pred.engine, 'precision', '')}".strip()
        print(f"{args.model}, tile {args.tile}, batch {args.batch}: torch fp32 against {name}")
        worst_labels, worst_probs = 1.0, 1.0
        for src in inputs:
            labels_a, probs_a = expected[src]
            labels_b, probs_b = outputs(pred, src, work / spec.replace(":", "-") / f"{src.stem}.mask.tif")
            valid = labels_a != 255
            labels = float((labels_a == labels_b)[valid].mean())
            close = np.abs(probs_a.astype(np.int16) - probs_b.astype(np.int16)) <= 1
            probs = float(close[:, valid].mean()) if close.ndim == 3 else float(close[valid].mean())
            worst_labels, worst_probs = min(worst_labels, labels), min(worst_probs, probs)
            print(f"  {src.name}: labels agree on {labels:.4%} of {valid.sum() / 1e6:.2f} M valid pixels; "
                  f"probabilities within 1/255 on {probs:.4%}", flush=True)
        print(f"  worst: labels {worst_labels:.4%}, probabilities {worst_probs:.4%}")


if __name__ == "__main__":
    main()
