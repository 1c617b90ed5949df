"""The registered variants: each one a name, a paper and a config; no copied modules."""
from __future__ import annotations

from typing import Any

from bigseg.models.ladder import LadderConfig, LadderDenseNet
from bigseg.models.registry import register

LDN_PAPER = "Krešo et al. 2019, arXiv 1905.05661"
LDN_NOTE = "SPP fuse D/4 as in the paper; authors' code: 512/128/512"
LDN_AUTHORS = {"spp_bottleneck": 512, "spp_level": 128, "spp_width": 512}


def _ladder(num_classes: int, in_channels: int, **config: Any) -> LadderDenseNet:
    return LadderDenseNet(num_classes, in_channels, LadderConfig.from_dict(config))


for _depth in ("121", "169", "161"):
    register(f"ladder-dn{_depth}", paper=LDN_PAPER, note=LDN_NOTE, reference=LDN_AUTHORS,
             densenet=_depth)(_ladder)
