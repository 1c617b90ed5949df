"""Ship a trained run: write its best model in half precision to weights/ and record it in the
manifest with its sha256, classes, palette, normalisation, training command, data and metrics.

    python tools/ship.py runs/camvid/best.pt ladder-dn121-camvid \\
        --eval val=eval-val.json --eval test=eval-test.json --command "bigseg train ..." --data CamVid

`--eight-bit` and `--pixel-size METRES` record what a run's checkpoint could not know of its
imagery (8-bit data of a run that predates the record; the ground pixel size of imagery without
georeferencing, an estimate), so that `bigseg predict` warns of inputs far from it.

A model trained in stages (a schedule continued from earlier weights with `--init`) names every
stage's command in order with one `--command` each; the manifest keeps them all.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from bigseg.atomic import write_text
from bigseg.checkpoint import half_precision, load_checkpoint, save_checkpoint
from bigseg.manifest import sha256

HERE = Path(__file__).resolve().parents[1] / "weights"  # the shipped weights, their manifest and figures


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("name")
    parser.add_argument("--eval", action="append", default=[], help="SPLIT=eval.json from `bigseg eval`")
    parser.add_argument("--command", action="append", required=True,
                        help="the `bigseg train` command that made it (once per stage, in order)")
    parser.add_argument("--data", required=True, help="what it was trained on")
    parser.add_argument("--licence", default="")
    parser.add_argument("--eight-bit", action="store_true",
                        help="record that the training imagery was 8-bit (runs that predate the record)")
    parser.add_argument("--pixel-size", type=float, default=None, metavar="METRES",
                        help="record the training imagery's ground pixel size where its files give none (an "
                             "estimate, said on the card): predict then warns of inputs far from it")
    args = parser.parse_args()

    ckpt = half_precision(load_checkpoint(args.checkpoint))
    if args.eight_bit:
        ckpt.input = {**ckpt.input, "eight_bit": True}
    if args.pixel_size is not None and not ckpt.input.get("pixel_size"):
        ckpt.input = {**ckpt.input, "pixel_size": [args.pixel_size, args.pixel_size], "units": "metre"}
    file = f"{args.name}.pt"
    save_checkpoint(ckpt, HERE / file)
    metrics = {}
    for item in args.eval:
        split, path = item.split("=", 1)
        report = json.loads(Path(path).read_text())
        metrics[split] = {"miou": round(report["miou"], 4), "pixel_accuracy": round(report["pixel_accuracy"], 4),
                          "iou": {k: None if v is None else round(v, 4) for k, v in report["iou"].items()},
                          "images": report["images"]}
    entry = {"name": args.name, "arch": ckpt.arch, "file": file, "sha256": sha256(HERE / file),
             "classes": ckpt.classes, "palette": ckpt.palette,
             "normalization": {"mean": ckpt.normalization.mean, "std": ckpt.normalization.std},
             "training_commands": args.command, "data": args.data, "licence": args.licence,
             "epochs": ckpt.training.get("epochs"), "steps": ckpt.training.get("steps"), "metrics": metrics}
    manifest_path = HERE / "manifest.json"
    manifest = json.loads(manifest_path.read_text()) if manifest_path.exists() else {"models": []}
    manifest["models"] = [m for m in manifest["models"] if m["name"] != args.name] + [entry]
    write_text(manifest_path, json.dumps(manifest, indent=1) + "\n")
    print(f"{HERE / file}: {(HERE / file).stat().st_size / 2**20:.1f} MiB, sha256 {entry['sha256'][:16]}...")


if __name__ == "__main__":
    main()
