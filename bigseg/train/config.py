"""The settings of a training run: a small frozen dataclass built once at the CLI edge (or in
Python), stored in every run checkpoint, compared on resume. No torch here."""
from __future__ import annotations

from dataclasses import MISSING, dataclass, field, fields

from bigseg.errors import TrainingError


@dataclass(frozen=True)
class TrainConfig:
    data: str
    run_dir: str
    arch: str = "ladder-dn121"
    arch_config: dict = field(default_factory=dict)
    epochs: int = 100
    batch_size: int = 8
    crop: int = 448
    scale_min: float = 0.5
    scale_max: float = 2.0
    flip: bool = True
    jitter: float = 0.0
    colour_jitter: float = 0.0     # per-channel gains in 1 +- this (white balance, dusk casts)
    gamma: float = 0.0             # tone curve x ** g, g log-uniform in [1 / (1 + this), 1 + this] (exposure)
    rotate: bool = False           # random quarter turns (aerial imagery)
    optimizer: str = "adam"        # adam | sgd
    lr: float = 4e-4
    weight_decay: float = 1e-4
    schedule: str = "cosine"       # cosine | poly
    min_lr: float = 1e-6
    pretrained_lr_factor: float = 0.25  # backbone weights loaded from ImageNet: lr / 4 (and wd / 4)
    backbone_weights: str | None = None
    grad_checkpoint: bool | None = None  # None: on with a GPU (memory), off on the CPU (20% time)
    aux_weight: float = 0.4
    class_balance: str = "none"    # none | median-frequency | enet (train/losses.py)
    lovasz: float = 0.0            # weight of the Lovász-softmax (mIoU) loss added to the CE
    rare_class_sampling: float = 0.0  # temperature of rare-class window sampling, raster scenes (0: off)
    scene_balance: float = 0.0     # raster scenes drawn ~ labelled area ** (1 - this): 0 by area, 1 each alike
    freeze_bn: bool = False        # batchnorm keeps the --init model's statistics (its scale and shift still learn)
    ema: float = 0.0               # decay per step of the weight average validated and saved (0: off)
    crop_schedule: tuple[tuple[int, float], ...] = ()  # (crop, until this fraction of the epochs), then `crop`
    channels_last: bool = True
    compile: bool = False
    init: str | None = None        # start from this checkpoint's weights (new optimiser and schedule)
    teacher: str | tuple[str, ...] | None = None  # distil this model's (or these models' mean) averaged predictions
    teacher_scales: tuple[float, ...] = (0.75, 1.0, 1.25, 1.5)
    teacher_flip: bool = True
    teacher_turns: bool = False    # and its three quarter turns (imagery seen from above)
    teacher_reduction: int = 1     # keep the targets at 1/F of each side (F^2 less disk; resized back per crop)
    distil: float = 1.0            # weight of the soft cross-entropy against the teacher's probabilities
    threads: int | None = None     # intra-op threads (None: one per core)
    device: str = "auto"
    precision: str = "auto"
    workers: int = 2
    data_on_device: bool = False   # decode the training split once onto the device, augment there
    seed: int = 0
    train_split: str = "train"     # or several joined, e.g. train+val for the final fit
    eval_every: int = 1
    val_split: str = "val"
    val_scales: tuple[float, ...] = (1.0,)  # validate as the model will be used (e.g. 2: CamVid at 960x720)
    val_tile: int = 1024
    sync_bn: bool = False
    recompute_bn: int = 0          # batches for exact BN statistics after training (0: off)
    max_steps: int | None = None   # stop (with a run checkpoint) after this many steps in all
    # raster scenes (image folders ignore these)
    windows_per_epoch: int | None = None  # None: the training regions' labelled pixels / crop^2
    bands: tuple[int, ...] | None = None  # 1-based image bands (None: every image band)
    value_range: tuple[float, float] | None = None  # fixed LOW,HIGH -> 0..255 for non-8-bit imagery
    pixel_size: float | None = None  # the ground pixel size (m) of imagery that does not say its own
    class_field: str | None = None  # vector labels: the attribute holding each polygon's class
    layer: str | None = None       # vector labels: the layer of a multi-layer file
    val_scenes: tuple[str, ...] = ()  # validation scenes by name (image stem); else the split rule
    val_block: int = 1024          # one scene: the side of the validation blocks, in pixels
    val_buffer: int = 64           # one scene: pixels between training and validation blocks

    def __post_init__(self):
        # one teacher is kept as its name, as runs stored it before several could be averaged
        if isinstance(self.teacher, (tuple, list)):
            names = tuple(map(str, self.teacher))
            object.__setattr__(self, "teacher", names[0] if len(names) == 1 else names or None)


DEFAULTS = {f.name: f.default for f in fields(TrainConfig) if f.default is not MISSING}
RESUMABLE = ("epochs", "max_steps", "workers", "device", "threads", "data_on_device")  # settings a resumed run may change


def parse_crop_schedule(text: str) -> tuple[tuple[int, float], ...]:
    """`192:0.6,320:1.0` -> ((192, 0.6), (320, 1.0)): 192 px crops until 60% of the epochs, then 320."""
    out = []
    for item in filter(None, (p.strip() for p in text.split(","))):
        crop, sep, until = item.partition(":")
        try:
            out.append((int(crop), float(until)))
        except ValueError:
            raise TrainingError(f"crop schedule: expected CROP:FRACTION,..., e.g. 192:0.6,320:1.0; got {item!r}") from None
    fractions = [u for _, u in out]
    if any(not 0 < u <= 1 for u in fractions) or fractions != sorted(fractions):
        raise TrainingError(f"crop schedule: fractions must rise within (0, 1], got {text!r}")
    return tuple(out)


def crop_at(cfg: TrainConfig, epoch: int) -> int:
    """The crop of `epoch` (0-based) under the crop schedule; `cfg.crop` after its last entry."""
    for crop, until in cfg.crop_schedule:
        if epoch < round(until * cfg.epochs):
            return crop
    return cfg.crop


def check_crops(cfg: TrainConfig, multiple: int) -> None:
    """Crops that are not multiples of the model's padding cost as much as the next multiple."""
    for crop, param in sorted({(cfg.crop, "crop"), *((c, "crop_schedule") for c, _ in cfg.crop_schedule)}):
        if crop % multiple:
            lower, upper = crop // multiple * multiple, -(-crop // multiple) * multiple
            raise TrainingError(f"{crop} is not a multiple of {multiple}: the model pads it to {upper} "
                                f"and pays for {upper}; use {upper}" + (f" or {lower}" if lower else ""), param=param)
