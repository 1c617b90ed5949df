"""What shapes an inference run, in one frozen value checked once where it is made (no torch):
device, precision, tiles, batch, scales, flips and turns, CRF, torch.compile, engine and threads."""
from __future__ import annotations

import os
from dataclasses import dataclass

from bigseg.crf.params import CRFParams
from bigseg.errors import InputError
from bigseg.infer.engines.base import engine_names

DEFAULT_TILE = 1024
DEFAULT_BATCH = 4
PRECISIONS = ("auto", "fp32", "bf16", "fp16")


def default_engine() -> str:
    """`$BIGSEG_ENGINE` (auto, torch, openvino or onnx) when set, else auto."""
    return os.environ.get("BIGSEG_ENGINE") or "auto"


def default_precision(name: str) -> str:
    """`$BIGSEG_PRECISION` replaces `auto` when set (the tests pin fp32 with it)."""
    return (os.environ.get("BIGSEG_PRECISION") or "auto") if name == "auto" else name


@dataclass(frozen=True)
class Settings:
    """`engine` None: `$BIGSEG_ENGINE` or auto; `threads` None: the run's own (torch's default)."""

    device: str = "auto"
    precision: str = "auto"
    tile: int = DEFAULT_TILE
    overlap: int | None = None
    batch_size: int = DEFAULT_BATCH
    scales: tuple[float, ...] = (1.0,)
    flip: bool = False
    crf: CRFParams | None = None
    compile: bool = False
    engine: str | None = None
    threads: int | None = None
    turns: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "scales", tuple(self.scales))
        object.__setattr__(self, "engine", self.engine or default_engine())
        if not self.scales or any(not 0.1 <= s <= 4 for s in self.scales):
            raise InputError(f"must be factors between 0.1 and 4, got {self.scales}", param="scales")
        if default_precision(self.precision) not in PRECISIONS:
            raise InputError(f"unknown precision {default_precision(self.precision)!r}; use auto, fp32, bf16 or fp16")
        if self.tile < 16:
            raise InputError(f"must be at least 16 pixels, got {self.tile}", param="tile")
        if self.batch_size < 1:
            raise InputError(f"must be at least 1, got {self.batch_size}", param="batch_size")
        if self.engine not in engine_names():
            raise InputError(f"takes {', '.join(engine_names())}, got {self.engine!r}", param="engine")
        if self.threads is not None and self.threads < 1:
            raise InputError(f"must be at least 1, got {self.threads}", param="threads")

    @property
    def averages_probabilities(self) -> bool:
        """Several scales, flips, turns or a CRF: tiles give probabilities instead of logits."""
        return self.scales != (1.0,) or self.flip or self.turns or self.crf is not None

    @property
    def plain(self) -> bool:
        """One scale, no flip or turn, no CRF, no torch.compile: what an exported model alone can run."""
        return not self.averages_probabilities and not self.compile
