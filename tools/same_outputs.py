"""Do two checkouts of bigseg compute the same? Runs the predict, vectorize, train and eval paths of
each on the same synthetic inputs and compares what they wrote:

    python tools/same_outputs.py --before /path/to/other/checkout [--keep FOLDER]

- predict: a georeferenced GeoTIFF with nodata, `--probs --overlay --vector gpkg --areas`, and a
  PNG photograph; the mask, probabilities and overlay byte for byte, the areas table's text, and
  the polygons' geometries, classes and areas (a GeoPackage file also holds the time it was written);
- vectorize: `bigseg vectorize` of the first mask, compared the same way;
- train: a tiny model for a few steps (image folders) and on raster scenes; the weights of
  `last.pt` bit for bit and the losses of log.json;
- eval: the report's scores.

Each checkout runs in its own process (`python -m bigseg` with that checkout first on the path), the
torch engine at fp32. Exit status 0 when everything is equal; each difference is named.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parents[1]


def make_inputs(folder: Path) -> dict[str, Path]:
    """A GeoTIFF with nodata, a PNG photograph, an image folder data set and a raster scenes one."""
    import cv2
    import rasterio
    from rasterio.transform import from_origin

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:300, 0:420]
    image = np.stack([(x * 0.6) % 255, (y * 0.8) % 255, ((x + y) * 0.3) % 255]).astype(np.uint8)
    image[:, :40, :60] = 0  # nodata corner
    tif = folder / "scene.tif"
    with rasterio.open(tif, "w", driver="GTiff", width=420, height=300, count=3, dtype="uint8", nodata=0,
                       crs="EPSG:32633", transform=from_origin(500000, 4600000, 0.5, 0.5), tiled=True,
                       blockxsize=128, blockysize=128) as ds:
        ds.write(image)
    png = folder / "photo.png"
    cv2.imwrite(str(png), rng.integers(0, 255, (90, 130, 3), np.uint8))
    folders = folder / "folders"
    scenes = folder / "scenes"
    for split, n in (("train", 6), ("val", 2)):
        (folders / split).mkdir(parents=True, exist_ok=True)
        (folders / f"{split}annot").mkdir(parents=True, exist_ok=True)
        for k in range(n):
            label = (rng.random((72, 96)) * 3).astype(np.uint8)
            cv2.imwrite(str(folders / split / f"{split}{k}.png"), (label[..., None] * 80 + rng.integers(0, 40, (72, 96, 3))).astype(np.uint8))
            cv2.imwrite(str(folders / f"{split}annot" / f"{split}{k}.png"), label)
    (folders / "test").mkdir(exist_ok=True)
    (folders / "testannot").mkdir(exist_ok=True)
    for sub in ("images", "labels"):
        (scenes / sub).mkdir(parents=True, exist_ok=True)
    for k in range(3):
        label = np.zeros((160, 200), np.uint8)
        label[40 + 10 * k:100, 50:150 - 20 * k] = 1
        label[120:, :] = 2
        pixels = (label[None].repeat(3, 0) * 70 + rng.integers(0, 50, (3, 160, 200))).astype(np.uint8)
        for sub, data, count in (("images", pixels, 3), ("labels", label[None], 1)):
            with rasterio.open(scenes / sub / f"s{k}.tif", "w", driver="GTiff", width=200, height=160, count=count,
                               dtype="uint8", crs="EPSG:32633",
                               transform=from_origin(500000 + 100 * k, 4600000, 1, 1)) as ds:
                ds.write(data)
    (scenes / "labels" / "classes.csv").write_text("value,name,red,green,blue\n0,land,200,180,120\n"
                                                   "1,building,200,0,0\n2,water,0,0,200\n")
    return {"tif": tif, "png": png, "folders": folders, "scenes": scenes}


def tiny_model(folder: Path) -> Path:
    """A tiny ladder-dn121 checkpoint of 3 classes (the same file for both checkouts)."""
    import torch

    from bigseg.checkpoint import from_model, save_checkpoint
    from bigseg.models import create_model

    torch.manual_seed(0)
    config = dict(densenet=dict(growth_rate=4, block_config=[1, 2, 2, 1], num_init_features=8, bn_size=2),
                  spp_bottleneck=8, spp_level=4, spp_width=8, up_widths=[8, 8, 8, 8], squeeze=8)
    model = create_model("ladder-dn121", 3, 3, **config).eval()
    return save_checkpoint(from_model(model, "ladder-dn121", ["land", "building", "water"]), folder / "tiny.pt")


TRAIN = ["--model", "ladder-dn121", "--epochs", "2", "--batch-size", "2", "--crop", "64", "--workers", "0",
         "--device", "cpu", "--precision", "fp32", "--seed", "3", "--eval-every", "1",
         "--model-config", "spp_level=4,spp_width=8,spp_bottleneck=8,squeeze=8"]


def run(checkout: Path, out: Path, inputs: dict[str, Path], model: Path) -> None:
    """Every path of one checkout, its outputs under `out`."""
    env = {**os.environ, "PYTHONPATH": str(checkout), "BIGSEG_ENGINE": "torch", "BIGSEG_PRECISION": "fp32",
           "BIGSEG_CACHE": str(out / "cache"), "OMP_WAIT_POLICY": "PASSIVE"}
    commands = [
        ["predict", inputs["tif"], inputs["png"], "-m", model, "-o", out / "predict", "--tile", "128", "--overlap",
         "32", "--probs", "--overlay", "--vector", "gpkg", "--areas", "--device", "cpu"],
        ["vectorize", out / "predict" / "scene.mask.tif", "-o", out / "vectorize"],
        ["train", "--data", inputs["folders"], "--run", out / "train-folders", *TRAIN],
        ["train", "--data", inputs["scenes"], "--run", out / "train-scenes", *TRAIN, "--windows-per-epoch", "8"],
        ["eval", "--model", out / "train-scenes" / "last.pt", "--data", inputs["scenes"], "--split", "val",
         "--device", "cpu", "-o", out / "eval.json"],
    ]
    for command in commands:
        done = subprocess.run([sys.executable, "-m", "bigseg", *map(str, command)], env=env, capture_output=True,
                              text=True, cwd=out)
        if done.returncode != 0:
            raise SystemExit(f"{checkout}: bigseg {command[0]} failed:\n{done.stderr[-2000:]}")


def differences(a: Path, b: Path) -> list[str]:
    """What differs between two checkouts' outputs."""
    import torch

    found = []
    for rel in ("predict/scene.mask.tif", "predict/scene.probs.tif", "predict/scene.overlay.png",
                "predict/scene.mask.qml", "predict/scene.mask.tif.aux.xml", "predict/scene.areas.csv",
                "predict/photo.mask.png", "predict/photo.probs.tif", "predict/photo.overlay.png",
                "predict/photo.areas.csv"):
        pa, pb = a / rel, b / rel
        if not pa.is_file() or not pb.is_file() or pa.read_bytes() != pb.read_bytes():
            found.append(f"{rel} differs or is missing")
    for rel in ("predict/scene.polygons.gpkg", "predict/photo.polygons.gpkg", "vectorize/scene.polygons.gpkg"):
        found += _polygons(a / rel, b / rel, rel)
    for run in ("train-folders", "train-scenes"):
        sa = torch.load(a / run / "last.pt", weights_only=True)["model"]
        sb = torch.load(b / run / "last.pt", weights_only=True)["model"]
        if sa.keys() != sb.keys() or any(not torch.equal(sa[k], sb[k]) for k in sa):
            found.append(f"{run}/last.pt: the weights differ")
        la, lb = (json.loads((x / run / "log.json").read_text()) for x in (a, b))
        strip = lambda log: [{k: v for k, v in r.items() if k != "seconds"} for r in log]
        if strip(la) != strip(lb):
            found.append(f"{run}/log.json: the losses or scores differ")
    ea, eb = (json.loads((x / "eval.json").read_text()) for x in (a, b))
    if ea.get("miou") != eb.get("miou") or ea.get("iou") != eb.get("iou"):
        found.append("eval.json: the scores differ")
    return found


def _polygons(a: Path, b: Path, rel: str) -> list[str]:
    from pyogrio.raw import read

    try:
        ma, _, ga, fa = read(a)
        mb, _, gb, fb = read(b)
    except Exception as e:  # one side missing or unreadable
        return [f"{rel}: {type(e).__name__}"]
    if list(ma["fields"]) != list(mb["fields"]) or len(ga) != len(gb):
        return [f"{rel}: {len(ga)} against {len(gb)} polygons"]
    same = all(bytes(x) == bytes(y) for x, y in zip(ga, gb))
    # the `source` field names the mask, which lies in each checkout's own output folder
    named = lambda name, values: [Path(v).name for v in values] if name == "source" else list(values)
    attributes = all(named(n, x) == named(n, y) for n, x, y in zip(ma["fields"], fa, fb))
    return [] if same and attributes else [f"{rel}: the polygons differ"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--before", type=Path, required=True, help="the other checkout (its repository root)")
    parser.add_argument("--keep", type=Path, default=None, help="keep the outputs in this folder")
    args = parser.parse_args()
    root = args.keep or Path(tempfile.mkdtemp(prefix="bigseg-same-"))
    inputs = make_inputs(root / "inputs")
    model = tiny_model(root / "inputs")
    for name, checkout in (("before", args.before.resolve()), ("after", HERE)):
        (root / name).mkdir(parents=True, exist_ok=True)
        run(checkout, root / name, inputs, model)
        print(f"{name}: {checkout} done", flush=True)
    found = differences(root / "before", root / "after")
    for line in found:
        print(line)
    print("the same outputs" if not found else f"{len(found)} difference(s)", f"({root})")
    raise SystemExit(1 if found else 0)


if __name__ == "__main__":
    main()
