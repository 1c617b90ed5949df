"""The model card: what a checkpoint says of its model, without its weights and without torch
(classes, palette, normalisation, bands, what it was trained on, its padding multiple and context
margin, the weights digest that identifies its exports). Both engines' predictors run from it; the
torch engine writes it to the cache the first time, so that a later run whose exports are cached
starts without torch (`bigseg.infer.engines.cached`)."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bigseg.atomic import write_text
from bigseg.infer.cache import cache_dir
from bigseg.manifest import find_entry, read_manifest, sha256, weights_dir

CARDS = "models"


def padded(shape: tuple[int, int], multiple: int) -> tuple[int, int]:
    """(h, w) rounded up to `multiple`, as the models pad (`bigseg.models.blocks.pad_to_multiple`):
    tiles whose sizes differ by less than a multiple share one export."""
    return -(-shape[0] // multiple) * multiple, -(-shape[1] // multiple) * multiple


@dataclass(frozen=True)
class Normalisation:
    mean: list[float]
    std: list[float]


@dataclass(frozen=True)
class ModelCard:
    arch: str
    config: dict
    classes: list[str]
    palette: list[list[int]]
    normalization: Normalisation
    in_channels: int
    output_multiple: int
    context_margin: int | None
    weights: str  # the weights digest: the identity of the exports
    input: dict = field(default_factory=dict)
    source: str = ""  # where it was loaded from (as the checkpoint's `source`)
    file_sha256: str = ""  # the model file's digest, when known

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def identity(self) -> dict:
        """What identifies the weights and architecture in an export's cache key."""
        return {"weights": self.weights, "arch": self.arch, "config": self.config}

    def padded(self, shape: tuple[int, int]) -> tuple[int, int]:
        return padded(shape, self.output_multiple)

    @property
    def shipped(self) -> bool:
        """Whether the model file is one of the installed shipped weights."""
        return bool(self.file_sha256) and any(e.get("sha256") == self.file_sha256 for e in read_manifest())

    def to_dict(self) -> dict:
        return {"arch": self.arch, "config": self.config, "classes": self.classes, "palette": self.palette,
                "normalization": {"mean": self.normalization.mean, "std": self.normalization.std},
                "in_channels": self.in_channels, "output_multiple": self.output_multiple,
                "context_margin": self.context_margin, "weights": self.weights, "input": self.input}

    @classmethod
    def from_dict(cls, d: dict, source: str = "", file_sha256: str = "") -> "ModelCard":
        return cls(d["arch"], dict(d["config"]), list(d["classes"]), [list(c) for c in d["palette"]],
                   Normalisation(list(d["normalization"]["mean"]), list(d["normalization"]["std"])),
                   int(d["in_channels"]), int(d["output_multiple"]), d.get("context_margin"), d["weights"],
                   dict(d.get("input") or {}), source, file_sha256)


def card_of(checkpoint: Any, model: Any, weights: str) -> ModelCard:
    """The card of a checkpoint (`bigseg.checkpoint.Checkpoint`) whose built model is `model`."""
    norm = checkpoint.normalization
    return ModelCard(checkpoint.arch, checkpoint.config, list(checkpoint.classes), [list(c) for c in checkpoint.palette],
                     Normalisation(list(norm.mean), list(norm.std)), checkpoint.in_channels,
                     getattr(model, "output_multiple", 1), getattr(model, "context_margin", None), weights,
                     checkpoint.input, checkpoint.source, checkpoint.file_sha256)


def model_file(spec: str) -> tuple[Path, str] | None:
    """The file `--model` names and its sha256 (a shipped model's from its manifest), or None."""
    path = Path(spec).expanduser()
    if path.is_file():
        return path, sha256(path)
    entry = find_entry(spec)
    if entry is None or not (weights_dir() / entry["file"]).is_file():
        return None
    return weights_dir() / entry["file"], entry["sha256"]


def write_card(card: ModelCard, file_sha256: str) -> None:
    """Keep `card` for the model file with this digest (a read-only cache only means no warm start
    without torch)."""
    try:
        (cache_dir() / CARDS).mkdir(parents=True, exist_ok=True)
        write_text(cache_dir() / CARDS / f"{file_sha256}.json", json.dumps(card.to_dict()))
    except OSError:
        pass


def read_card(file_sha256: str, source: str) -> ModelCard | None:
    try:
        d = json.loads((cache_dir() / CARDS / f"{file_sha256}.json").read_text())
        return ModelCard.from_dict(d, source, file_sha256)
    except (OSError, ValueError, KeyError, TypeError):
        return None
