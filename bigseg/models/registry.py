"""Architectures by name: one decorator to register a builder, one door (`create_model`) to build."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from torch import nn

from bigseg.catalogue import ARCHITECTURES, ArchFacts
from bigseg.errors import InputError


@dataclass(frozen=True)
class ArchSpec:
    """A registered architecture: its builder, default config and the authors' overrides; its
    paper and parameter counts are in `bigseg.catalogue` (listed without loading torch)."""

    name: str
    builder: Callable[..., nn.Module]
    defaults: dict[str, Any] = field(default_factory=dict)
    reference: dict[str, Any] = field(default_factory=dict)  # config overrides of the authors' code

    @property
    def facts(self) -> ArchFacts:
        return ARCHITECTURES[self.name]

    @property
    def paper(self) -> str:
        return self.facts.paper


_REGISTRY: dict[str, ArchSpec] = {}


def register(name: str, reference: dict[str, Any] | None = None, **defaults: Any):
    """Register `builder(num_classes, in_channels, **config)` under `name` with config `defaults`;
    `reference`: the overrides that reproduce the authors' published model, for reporting. Every
    name has its facts in `bigseg.catalogue`."""

    def wrap(builder: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if name in _REGISTRY:
            raise ValueError(f"architecture {name!r} is registered twice")
        if name not in ARCHITECTURES:
            raise ValueError(f"architecture {name!r} has no entry in bigseg.catalogue")
        _REGISTRY[name] = ArchSpec(name, builder, dict(defaults), dict(reference or {}))
        return builder

    return wrap


def get_arch(name: str) -> ArchSpec:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise InputError(f"unknown architecture {name!r}; known: {', '.join(sorted(_REGISTRY))}") from None


def list_archs() -> list[ArchSpec]:
    return [_REGISTRY[k] for k in sorted(_REGISTRY)]


def create_model(name: str, num_classes: int, in_channels: int = 3, **config: Any) -> nn.Module:
    """Build architecture `name`; `config` overrides its registered defaults."""
    spec = get_arch(name)
    return spec.builder(num_classes=num_classes, in_channels=in_channels, **{**spec.defaults, **config})


def model_config(model: nn.Module) -> dict[str, Any]:
    """The plain-data config that rebuilds `model` with `create_model` (stored in checkpoints)."""
    return model.config.to_dict()


def parse_model_config(text: str) -> dict[str, Any]:
    """`KEY=VALUE,...` -> dict: integers, floats, true/false, and tuples written a/b/c."""
    def value(v: str) -> Any:
        if "/" in v:
            return [value(p) for p in v.split("/")]
        if v.lower() in ("true", "false"):
            return v.lower() == "true"
        for kind in (int, float):
            try:
                return kind(v)
            except ValueError:
                pass
        return v

    out: dict[str, Any] = {}
    for item in filter(None, (p.strip() for p in text.split(","))):
        key, sep, v = item.partition("=")
        if not sep or not key.strip() or not v.strip():
            raise InputError(f"expects KEY=VALUE, got {item!r}", param="model_config")
        out[key.strip()] = value(v.strip())
    return out


def validate_config(name: str, config: dict[str, Any]) -> None:
    """Build `name` with `config` on the meta device (no memory); a bad setting is an InputError."""
    import torch

    try:
        with torch.device("meta"):
            create_model(name, 2, **config)
    except (TypeError, ValueError) as e:
        raise InputError(f"for {name}: {e}", param="model_config") from None
