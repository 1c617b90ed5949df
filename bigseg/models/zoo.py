"""The registered variants: each one a name, a paper and a config; no copied modules."""
from __future__ import annotations

from typing import Any

from bigseg.models.deeplab import DeepLabV3Plus, DeepLabV3PlusConfig
from bigseg.models.dupsampling import DUpsamplingConfig, DUpsamplingNet
from bigseg.models.routing import DynamicRouting, DynamicRoutingConfig
from bigseg.models.ladder import LadderConfig, LadderDenseNet
from bigseg.models.refinenet import RefineNet, RefineNetConfig
from bigseg.models.registry import register

LDN_PAPER = "Krešo et al. 2019, arXiv 1905.05661"
LDN_NOTE = "SPP fuse D/4 as in the paper; reference: authors' code, SPP 512/128/512"
LDN_AUTHORS = {"spp_bottleneck": 512, "spp_level": 128, "spp_width": 512}


def _ladder(num_classes: int, in_channels: int, **config: Any) -> LadderDenseNet:
    return LadderDenseNet(num_classes, in_channels, LadderConfig.from_dict(config))


for _depth in ("121", "169", "161"):
    register(f"ladder-dn{_depth}", paper=LDN_PAPER, note=LDN_NOTE, reference=LDN_AUTHORS,
             densenet=_depth)(_ladder)


def _configured(model_class, config_class):
    def build(num_classes: int, in_channels: int, **config: Any):
        return model_class(num_classes, in_channels, config_class.from_dict(config))
    return build


_DEEPLAB = "Chen et al. 2018, arXiv 1802.02611"
for _depth in (50, 101):
    register(f"deeplabv3plus-rn{_depth}", paper=_DEEPLAB,
             note="OS 16, two 3x3 decoder convs; reference: one (VainF port)",
             reference={"decoder_convs": 1}, depth=_depth)(_configured(DeepLabV3Plus, DeepLabV3PlusConfig))

register("refinenet-rn101", paper="Lin et al. 2017, arXiv 1611.06612",
         note="2-stage CRP; reference: 4 (authors' later code)",
         reference={"crp_stages": 4}, depth=101)(_configured(RefineNet, RefineNetConfig))

register("dupsampling-rn50", paper="Tian et al. 2019, arXiv 1903.02120",
         note="OS 16; W fitted by PCA on the training labels",
         depth=50)(_configured(DUpsamplingNet, DUpsamplingConfig))

register("dynamic-routing-l16", paper="Li et al. 2020, arXiv 2003.10401",
         note="Dynamic-Raw; budget_lambda > 0 for A/B/C",
         layers=16)(_configured(DynamicRouting, DynamicRoutingConfig))
