"""Distillation targets: a teacher model's class probabilities for every training image, averaged
over scales and flips as `predict --scales ... --flip` averages them, so that one pass of the
student learns what several passes of the teacher see (knowledge distillation, Hinton et al. 2015;
pixel-wise for segmentation, Liu et al. CVPR 2019). Several teachers (an ensemble) give the mean
of their averaged probabilities, as Hinton et al. distil an ensemble into one model.

The targets are computed once, before the first step, and kept in the run folder (`teacher/`):
one float16 (H, W, classes) file per training image (H and W divided by `--teacher-reduction`),
each written atomically, so an interrupted computation resumes where it stopped and a resumed run
reads them back. `teacher/spec.json` names the teachers' weights, their scales and flips, the
reduction and the images; targets made for another spec are thrown away and made again. Under
torchrun every process computes its share.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from bigseg import distributed as D
from bigseg.atomic import atomic_path, write_text
from bigseg.checkpoint import resolve_model
from bigseg.errors import BigsegError, TrainingError
from bigseg.predictor import Predictor
from bigseg.runtime import check_stop
from bigseg.train.transforms import resize_channels

FOLDER = "teacher"
MARGIN = 1 << 30  # free space the targets leave for the run's checkpoints and logs


class TeacherTargets:
    """The targets in `folder`, one per training image index (`[i]` -> float16 (H, W, classes), at
    the kept size; the augmentation resizes them with the image)."""

    def __init__(self, folder: Path, count: int):
        self.folder, self.count = Path(folder), count

    def path(self, i: int) -> Path:
        return self.folder / f"{i:06d}.npy"

    def __getitem__(self, i: int) -> np.ndarray:
        return np.load(self.path(i))

    def missing(self) -> list[int]:
        return [i for i in range(self.count) if not self.path(i).is_file()]


def kept_size(height: int, width: int, reduction: int) -> tuple[int, int]:
    """The (width, height) a target is kept at: 1/`reduction` of each side, rounded up."""
    return -(-width // reduction), -(-height // reduction)


def _check_space(folder: Path, missing: list[int], train_set, classes: int, reduction: int) -> int:
    """The bytes the `missing` targets will take (float16, 2 x classes bytes a kept pixel: about 80 MB
    a 2048x1024 frame of 19 classes at full size), estimated from the first of them; refused where
    the disk holding `folder` has not that much free, with a margin, before hours of computing fill it."""
    image, _ = train_set[missing[0]]
    w, h = kept_size(*image.shape[:2], reduction)
    need = len(missing) * (h * w * classes * 2 + 128)
    free = shutil.disk_usage(folder).free
    if need + MARGIN > free:
        raise TrainingError(f"--teacher: the targets of {len(missing)} images take about {need / 1e9:.2f} GB "
                            f"(float16, {classes} classes a pixel) and {folder} has {free / 1e9:.2f} GB free; "
                            f"make room, use a run folder (--run) on a larger disk, or keep them smaller "
                            f"(--teacher-reduction {2 * reduction}: 4x less)")
    return need


def _predictor(spec: str, train_set, device, scales: tuple[float, ...], flip: bool, tile: int) -> Predictor:
    """The predictor of one teacher, refused unless it predicts the training data's classes."""
    try:
        ckpt = resolve_model(spec)
    except BigsegError as e:
        raise TrainingError(f"--teacher: {e}") from None
    if list(ckpt.classes) != list(train_set.classes):
        raise TrainingError(f"--teacher {spec} predicts {len(ckpt.classes)} classes ({', '.join(ckpt.classes[:3])}, "
                            f"...); the training data has {len(train_set.classes)} "
                            f"({', '.join(train_set.classes[:3])}, ...)")
    return Predictor(ckpt, str(device), "fp32" if device.type == "cpu" else "auto", tile=tile,
                     scales=tuple(scales), flip=flip, engine="torch")


def _probabilities(predictor: Predictor, image: np.ndarray) -> np.ndarray:
    """One teacher's (C, H, W) probabilities for a (3, H, W) image, averaged over its scales and flips."""
    probs = predictor.scores(image)
    if not predictor.averages_probabilities:  # one scale, no flip: the model's logits
        probs = torch.from_numpy(probs).softmax(0).numpy()
    return probs


def prepare_teacher(spec: str | tuple[str, ...], train_set, run_dir: Path, device, scales: tuple[float, ...],
                    flip: bool, tile: int, d: D.Rank = D.Rank(),
                    on_event: Callable[[str, dict], None] = lambda kind, info: None,
                    reduction: int = 1) -> TeacherTargets:
    """Make (or find) the targets of the teacher `spec` (or the mean of several) for every image of
    `train_set` in `run_dir/teacher`, kept at 1/`reduction` of each side (the teacher's averaged
    probabilities are smooth: a model of output stride 4 predicts at a quarter of the size); under
    torchrun (`d`) the main process checks the folder's spec, then each process computes every
    world-th missing image, and all wait for the rest."""
    specs = (spec,) if isinstance(spec, str) else tuple(spec)
    predictors = [_predictor(s, train_set, device, scales, flip, tile) for s in specs]
    digests = [p.weights_digest for p in predictors]
    for i, digest in enumerate(digests):
        if digest in digests[:i]:
            raise TrainingError(f"--teacher {specs[i]} has the weights of --teacher {specs[digests.index(digest)]}; "
                                f"name each teacher once")
    wanted = {"weights": digests[0] if len(digests) == 1 else digests,  # one: as specs were before ensembles
              "scales": list(scales), "flip": flip, "tile": tile,
              "images": [str(Path(s.image).resolve()) for s in train_set.samples],
              **({"reduction": reduction} if reduction != 1 else {})}  # full size: as specs were before it
    folder = Path(run_dir) / FOLDER
    spec_file = folder / "spec.json"
    if d.main:
        if folder.is_dir() and (not spec_file.is_file() or json.loads(spec_file.read_text()) != wanted):
            shutil.rmtree(folder)  # made by another teacher, at other scales or for other images
        folder.mkdir(parents=True, exist_ok=True)
        if not spec_file.is_file():
            write_text(spec_file, json.dumps(wanted, indent=1))
    D.barrier(d)
    targets = TeacherTargets(folder, len(train_set))
    missing = targets.missing()
    todo = missing[d.rank::d.world]
    if todo:
        need = _check_space(folder, missing, train_set, len(train_set.classes), reduction)
        on_event("teacher", {"images": len(todo), "of": len(train_set), "teachers": len(specs),
                             "scales": list(scales), "flip": flip, "bytes": need})
    for n, i in enumerate(todo):
        check_stop()
        image, _ = train_set[i]
        image = np.moveaxis(image, -1, 0).astype(np.float32)  # once for every teacher
        probs = _probabilities(predictors[0], image)
        for predictor in predictors[1:]:
            probs += _probabilities(predictor, image)
        probs = np.moveaxis(probs / len(predictors), 0, -1)
        if reduction != 1:
            probs = resize_channels(probs, kept_size(*probs.shape[:2], reduction))
        with atomic_path(targets.path(i)) as tmp, open(tmp, "wb") as f:
            np.save(f, np.ascontiguousarray(probs).astype(np.float16))
        on_event("teacher_image", {"done": n + 1, "images": len(todo)})
    D.barrier(d)
    missing = targets.missing()
    if missing:
        raise TrainingError(f"the teacher's targets for {len(missing)} images are missing from {folder} "
                            f"(did another process fail?)")
    return targets
