"""The registered variants: each one a name, a paper and a config; no copied modules."""
from __future__ import annotations

from typing import Any

from bigseg.models.deeplab import (
    DeepLabV1,
    DeepLabV1Config,
    DeepLabV2,
    DeepLabV2Config,
    DeepLabV3,
    DeepLabV3Config,
    DeepLabV3Plus,
    DeepLabV3PlusConfig,
)
from bigseg.models.dupsampling import DUpsamplingConfig, DUpsamplingNet
from bigseg.models.ladder import LadderConfig, LadderDenseNet
from bigseg.models.refinenet import RefineNet, RefineNetConfig
from bigseg.models.registry import register
from bigseg.models.routing import DynamicRouting, DynamicRoutingConfig
from bigseg.models.swiftnet import ENCODERS, SwiftNet, SwiftNetConfig

LDN_AUTHORS = {"spp_bottleneck": 512, "spp_level": 128, "spp_width": 512}


def _ladder(num_classes: int, in_channels: int, **config: Any) -> LadderDenseNet:
    return LadderDenseNet(num_classes, in_channels, LadderConfig.from_dict(config))


for _depth in ("121", "169", "161"):
    register(f"ladder-dn{_depth}", reference=LDN_AUTHORS, densenet=_depth)(_ladder)


def _configured(model_class, config_class):
    def build(num_classes: int, in_channels: int, **config: Any):
        return model_class(num_classes, in_channels, config_class.from_dict(config))
    return build


register("deeplabv1-vgg16")(_configured(DeepLabV1, DeepLabV1Config))
register("deeplabv2-rn101", depth=101)(_configured(DeepLabV2, DeepLabV2Config))
register("deeplabv3-rn101", depth=101)(_configured(DeepLabV3, DeepLabV3Config))
for _depth in (50, 101):
    register(f"deeplabv3plus-rn{_depth}", reference={"decoder_convs": 1},
             depth=_depth)(_configured(DeepLabV3Plus, DeepLabV3PlusConfig))
register("deeplabv3plus-xception65", backbone="xception65",
         separable=True)(_configured(DeepLabV3Plus, DeepLabV3PlusConfig))

register("refinenet-rn101", reference={"crp_stages": 4}, depth=101)(_configured(RefineNet, RefineNetConfig))
register("dupsampling-rn50", depth=50)(_configured(DUpsamplingNet, DUpsamplingConfig))
register("dynamic-routing-l16", layers=16)(_configured(DynamicRouting, DynamicRoutingConfig))

for _encoder in ENCODERS:
    register(f"swiftnet-{_encoder}", encoder=_encoder)(_configured(SwiftNet, SwiftNetConfig))
