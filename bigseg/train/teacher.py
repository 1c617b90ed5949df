"""Distillation targets: a teacher model's class probabilities for every training image, averaged
over scales, flips and turns as `predict --scales ... --flip --rotate` averages them, so that one pass of the
student learns what several passes of the teacher see (knowledge distillation, Hinton et al. 2015;
pixel-wise for segmentation, Liu et al. CVPR 2019). Several teachers (an ensemble) give the mean
of their averaged probabilities, as Hinton et al. distil an ensemble into one model.

The targets are computed once, before the first step, and kept in the run folder (`teacher/`):
one float16 (H, W, classes) file per training image or scene (H and W divided by
`--teacher-reduction`), each written atomically, so an interrupted computation resumes where it
stopped and a resumed run reads them back. A scene's targets are streamed through the teacher's
tiles into a memory map and read back window by window (training windows are then aligned to the
reduction, so a window's targets are an exact slice). `teacher/spec.json` names the teachers' weights, their scales and flips, the
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
from bigseg.infer.engines.torch import HostCopy
from bigseg.errors import BigsegError, TrainingError
from bigseg.tiling.geometry import Window
from bigseg.infer.predictor import Predictor
from bigseg.runtime import check_stop
from bigseg.train.data import DataSplit, Region
from bigseg.train.transforms import resize_channels

FOLDER = "teacher"
MARGIN = 1 << 30  # free space the targets leave for the run's checkpoints and logs


class TeacherTargets:
    """The targets in `folder`, one file per item (image or scene) of the training split, kept at
    1/`reduction` of each side; `window(item, window)` gives the float16 (h, w, classes) targets of
    a window (None: the whole image), read from a memory map (a scene's need not fit in memory)."""

    def __init__(self, folder: Path, items: list[int], reduction: int = 1):
        self.folder, self.items, self.reduction = Path(folder), list(items), reduction

    def path(self, item: int) -> Path:
        return self.folder / f"{item:06d}.npy"

    def window(self, item: int, window: Window | None) -> np.ndarray:
        if window is None:
            return np.load(self.path(item))
        f = self.reduction
        kept = np.load(self.path(item), mmap_mode="r")
        return np.array(kept[window.row_off // f:-(-window.row_end // f), window.col_off // f:-(-window.col_end // f)])

    def missing(self) -> list[int]:
        return [i for i in self.items if not self.path(i).is_file()]


def kept_size(height: int, width: int, reduction: int) -> tuple[int, int]:
    """The (width, height) a target is kept at: 1/`reduction` of each side, rounded up."""
    return -(-width // reduction), -(-height // reduction)


def _check_space(folder: Path, missing: list[int], data: DataSplit, classes: int, reduction: int) -> int:
    """The bytes the `missing` targets will take (float16, 2 x classes bytes a kept pixel: about 80 MB
    a 2048x1024 frame of 19 classes at full size; a scene's is written at full size first, then kept
    smaller), refused where the disk holding `folder` has not that much free, with a margin, before
    hours of computing fill it."""
    sizes = [data.source.size(i) for i in missing]
    need = sum(np.prod(kept_size(h, w, reduction)) * classes * 2 + 128 for w, h in sizes)
    read_whole = data.source.extent(Region(missing[0])) is None  # images: resized once, no full-size scratch
    scratch = 0 if read_whole or reduction == 1 else max(w * h for w, h in sizes) * classes * 2
    free = shutil.disk_usage(folder).free
    if need + scratch + MARGIN > free:
        raise TrainingError(f"--teacher: the targets of {len(missing)} images take about {need / 1e9:.2f} GB "
                            f"(float16, {classes} classes a pixel) and {folder} has {free / 1e9:.2f} GB free; "
                            f"make room, use a run folder (--run) on a larger disk, or keep them smaller "
                            f"(--teacher-reduction {2 * reduction}: 4x less)")
    return int(need)


def _predictor(spec: str, data: DataSplit, device, scales: tuple[float, ...], flip: bool, tile: int,
               turns: bool = False) -> Predictor:
    """The predictor of one teacher, refused unless it predicts the training data's classes."""
    try:
        ckpt = resolve_model(spec)
    except BigsegError as e:
        raise TrainingError(f"--teacher: {e}") from None
    if list(ckpt.classes) != list(data.classes):
        raise TrainingError(f"--teacher {spec} predicts {len(ckpt.classes)} classes ({', '.join(ckpt.classes[:3])}, "
                            f"...); the training data has {len(data.classes)} "
                            f"({', '.join(data.classes[:3])}, ...)")
    if ckpt.in_channels != data.source.channels:
        raise TrainingError(f"--teacher {spec} takes {ckpt.in_channels} bands; the training data has "
                            f"{data.source.channels}")
    return Predictor(ckpt, str(device), "fp32" if device.type == "cpu" else "auto", tile=tile,
                     scales=tuple(scales), flip=flip, engine="torch", turns=turns)


def _probabilities(predictor: Predictor, image: np.ndarray) -> np.ndarray:
    """One teacher's (C, H, W) probabilities for a (3, H, W) image, averaged over its scales, flips, turns."""
    probs = predictor.scores(image)
    if not predictor.averages_probabilities:  # one scale, no flip or turn: the model's logits
        probs = torch.from_numpy(probs).softmax(0).numpy()
    return probs


def prepare_teacher(spec: str | tuple[str, ...], data: DataSplit, run_dir: Path, device, scales: tuple[float, ...],
                    flip: bool, tile: int, d: D.Rank = D.Rank(),
                    on_event: Callable[[str, dict], None] = lambda kind, info: None,
                    reduction: int = 1, turns: bool = False) -> TeacherTargets:
    """Make (or find) the targets of the teacher `spec` (or the mean of several) for every item of
    the training split `data` in `run_dir/teacher`, kept at 1/`reduction` of each side (the
    teacher's averaged probabilities are smooth: a model of output stride 4 predicts at a quarter
    of the size); under torchrun (`d`) the main process checks the folder's spec, then each
    process computes every world-th missing item, and all wait for the rest."""
    specs = (spec,) if isinstance(spec, str) else tuple(spec)
    predictors = [_predictor(s, data, device, scales, flip, tile, turns) for s in specs]
    digests = [p.card.weights for p in predictors]
    for i, digest in enumerate(digests):
        if digest in digests[:i]:
            raise TrainingError(f"--teacher {specs[i]} has the weights of --teacher {specs[digests.index(digest)]}; "
                                f"name each teacher once")
    items = sorted({r.item for r in data.regions})
    wanted = {"weights": digests[0] if len(digests) == 1 else digests,  # one: as specs were before ensembles
              "scales": list(scales), "flip": flip, "tile": tile,
              "images": [str(Path(data.source.item_id(i))) for i in items],
              **({"reduction": reduction} if reduction != 1 else {}),  # full size: as specs were before it
              **({"turns": True} if turns else {}),  # without: as specs were before turns
              **({} if data.source.extent(data.regions[0]) is None else
                 {"regions": [_region_spec(data, r) for r in data.regions]})}
    folder = Path(run_dir) / FOLDER
    spec_file = folder / "spec.json"
    if d.main:
        if folder.is_dir() and (not spec_file.is_file() or json.loads(spec_file.read_text()) != wanted):
            shutil.rmtree(folder)  # made by another teacher, at other scales or for other images
        folder.mkdir(parents=True, exist_ok=True)
        if not spec_file.is_file():
            write_text(spec_file, json.dumps(wanted, indent=1))
    D.barrier(d)
    targets = TeacherTargets(folder, items, reduction)
    missing = targets.missing()
    todo = missing[d.rank::d.world]
    if todo:
        need = _check_space(folder, missing, data, len(data.classes), reduction)
        on_event("teacher", {"images": len(todo), "of": len(items), "teachers": len(specs),
                             "scales": list(scales), "flip": flip, "turns": turns, "bytes": need})
    for n, item in enumerate(todo):
        check_stop()
        if data.source.extent(Region(item)) is None:  # an image read whole
            _image_targets(predictors, data, item, targets)
        else:
            _scene_targets(predictors, data, item, targets)
        on_event("teacher_image", {"done": n + 1, "images": len(todo)})
    D.barrier(d)
    missing = targets.missing()
    if missing:
        raise TrainingError(f"the teacher's targets for {len(missing)} images are missing from {folder} "
                            f"(did another process fail?)")
    return targets


def _region_spec(data: DataSplit, region: Region) -> list[int]:
    b = data.source.bounds(region)
    return [region.item, b.col_off, b.row_off, b.width, b.height]


def _image_targets(predictors: list[Predictor], data: DataSplit, item: int, targets: TeacherTargets) -> None:
    """A whole image's targets: its probabilities averaged over the teachers, resized once."""
    patch = data.source.read(item)
    image = patch.image.astype(np.float32)  # once for every teacher
    probs = _probabilities(predictors[0], image)
    for predictor in predictors[1:]:
        probs += _probabilities(predictor, image)
    probs = np.moveaxis(probs / len(predictors), 0, -1)
    if targets.reduction != 1:
        probs = resize_channels(probs, kept_size(*probs.shape[:2], targets.reduction))
    with atomic_path(targets.path(item)) as tmp, open(tmp, "wb") as f:
        np.save(f, np.ascontiguousarray(probs).astype(np.float16))


def _scene_targets(predictors: list[Predictor], data: DataSplit, item: int, targets: TeacherTargets) -> None:
    """A scene's targets over its training regions, streamed through each teacher's tiles into a
    memory-mapped file (bounded memory), then kept at 1/reduction by block means; zero elsewhere."""
    source, f = data.source, targets.reduction
    width, height = source.size(item)
    classes = predictors[0].num_classes
    path = targets.path(item)
    with atomic_path(path) as tmp:
        full = np.lib.format.open_memmap(tmp if f == 1 else tmp.with_suffix(".full.npy"), "w+", np.float16,
                                         (height, width, classes))
        for region in (r for r in data.regions if r.item == item):
            bounds = source.bounds(region)
            for k, predictor in enumerate(predictors):
                _stream_probabilities(predictor, source, item, bounds, full, 1 / len(predictors), k > 0)
        full.flush()
        if f != 1:
            _block_means(full, tmp, f)
            del full
            tmp.with_suffix(".full.npy").unlink()
        else:
            del full


def _stream_probabilities(predictor: Predictor, source, item: int, bounds: Window, out: np.ndarray, weight: float,
                          add: bool) -> None:
    """`weight` x the teacher's probabilities over `bounds`, written (or added) into `out`."""
    def read(window: Window):
        patch = source.read(item, _shift(window, bounds))
        return patch.image.astype(np.float32), patch.valid

    def finish(window: Window, block: torch.Tensor, valid):
        probs = block if predictor.averages_probabilities else block.softmax(0)
        return window, HostCopy({"p": probs * weight}), valid

    for window, copy, _ in predictor.stream(predictor.grid(bounds.width, bounds.height), read, finish):
        if copy is None:
            continue
        rows, cols = _shift(window, bounds).slices
        p = np.moveaxis(copy.numpy()["p"], 0, -1)
        out[rows, cols] = (out[rows, cols].astype(np.float32) + p) if add else p


def _block_means(full: np.ndarray, path: Path, f: int, strip: int = 64) -> None:
    """`full` (H, W, C) kept at 1/f of each side into a new .npy at `path`: the mean of each f x f
    block (of the pixels there are, at the right and bottom edges), `strip` kept rows at a time."""
    h, w, c = full.shape
    kh, kw = -(-h // f), -(-w // f)
    kept = np.lib.format.open_memmap(path, "w+", np.float16, (kh, kw, c))
    cols = np.minimum(np.arange(1, kw + 1) * f, w) - np.arange(kw) * f
    for r0 in range(0, kh, strip):
        r1 = min(kh, r0 + strip)
        block = full[r0 * f:min(h, r1 * f)].astype(np.float32)
        rows = np.minimum(np.arange(r0 + 1, r1 + 1) * f, h) - np.arange(r0, r1) * f
        padded = np.zeros(((r1 - r0) * f, kw * f, c), np.float32)
        padded[:block.shape[0], :w] = block
        sums = padded.reshape(r1 - r0, f, kw, f, c).sum((1, 3))
        kept[r0:r1] = sums / (rows[:, None, None] * cols[None, :, None])
    kept.flush()
    del kept


def _shift(window: Window, bounds: Window) -> Window:
    return Window(window.col_off + bounds.col_off, window.row_off + bounds.row_off, window.width, window.height)
