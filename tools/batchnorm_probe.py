"""How much a model's score hangs on its batchnorm statistics: replace them by exact averages over
training windows drawn with each scene balance (`bigseg train --scene-balance`) and score each on
the validation split, as a training run validates. The weights are not changed on disk.

    python tools/batchnorm_probe.py MODEL.pt DATA RUN_DIR [BALANCE ...] [--batches N]

e.g. `python tools/batchnorm_probe.py weights/landcover-dubai.pt ../shared/data/aerial/dubai
/tmp/probe 0 1` (the land-cover card's figures: two runs of about 200 s on 2 CPU cores).
"""
from __future__ import annotations

import argparse
import time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("data")
    parser.add_argument("run_dir", help="where each probe writes its data.json")
    parser.add_argument("balance", nargs="*", type=float, default=[0.0, 1.0])
    parser.add_argument("--batches", type=int, default=40)
    parser.add_argument("--crop", type=int, default=384)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seed", type=int, default=3)
    args = parser.parse_args()

    from bigseg.checkpoint import load_checkpoint
    from bigseg.train.config import TrainConfig
    from bigseg.train.loop import augmentation, recompute_batchnorm, start

    model = load_checkpoint(args.model)
    trained = model.training.get("config", {})  # the run's own validation split and bands
    for balance in args.balance:
        cfg = TrainConfig(data=args.data, run_dir=f"{args.run_dir}/balance-{balance:g}", init=args.model,
                          arch=model.arch, arch_config=dict(model.config),
                          val_scenes=tuple(trained.get("val_scenes", ())),
                          bands=tuple(trained["bands"]) if trained.get("bands") else None,
                          scene_balance=balance, recompute_bn=args.batches, crop=args.crop,
                          batch_size=args.batch_size, scale_min=0.5, scale_max=1.5, rotate=True, workers=1,
                          device="cpu", seed=args.seed, epochs=1)
        began = time.perf_counter()
        run = start(cfg, False, lambda kind, info: print(info["text"]) if kind == "note" else None)
        recompute_batchnorm(run.average.model, run.data, augmentation(cfg, 0), cfg, run.env.device, run.mean, run.std)
        scores = run.validate()
        per_class = ", ".join(f"{name} {100 * iou:.2f}" for name, iou in scores["val_iou"].items())
        print(f"scene balance {balance:g}: val mIoU {100 * scores['val_miou']:.2f} ({per_class}); "
              f"{time.perf_counter() - began:.0f} s", flush=True)


if __name__ == "__main__":
    main()
