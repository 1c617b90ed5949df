"""Parameters and multiply-adds ("GFLOPs" as these papers count them) of each registered
architecture at 1024x2048 and 19 classes (and DeepLab v1/v2 also at 513x513 and 21 classes, as
their papers report PASCAL VOC), in the default and the reference configuration, beside the
published or reference-code figures (../shared/MODELS.md; nan where there is none).

    python benchmarks/model_complexity.py
"""
from __future__ import annotations

import math

import torch

from bigseg.models import create_model, get_arch, list_archs
from bigseg.models.complexity import count_macs, count_parameters

NAN = math.nan
# (name, label, config or "reference", published params M, published GMACs, source[, (h, w, classes)])
ROWS = [
    ("deeplabv1-vgg16", "LargeFOV", {}, 20.5, NAN, "DeepLab v1 paper Table 2 (VOC, 21 classes)", (513, 513, 21)),
    ("deeplabv1-vgg16", "LargeFOV", {}, NAN, NAN, ""),
    ("deeplabv2-rn101", "ASPP-L", {}, 44.05, NAN, "ResNet-101 without fc (42.50) + 4 x 3x3x2048x21", (513, 513, 21)),
    ("deeplabv2-rn101", "ASPP-L", {}, NAN, NAN, ""),
    ("deeplabv3-rn101", "eval OS 8", {}, NAN, NAN, ""),
    ("deeplabv3-rn101", "OS 16", {"eval_output_stride": 16}, NAN, NAN, ""),
    ("deeplabv3-rn101", "VOC OS 8", {}, 58.63, NAN, "torchvision deeplabv3_resnet101 without aux head", (513, 513, 21)),
    ("deeplabv3plus-xception65", "OS 16", {}, NAN, 418.64, "TF DeepLab model zoo (1025x2049)", (1025, 2049, 19)),
    ("deeplabv3plus-xception65", "OS 16", {}, NAN, NAN, ""),
    ("ladder-dn121", "paper", {}, NAN, NAN, ""),
    ("ladder-dn121", "authors", "reference", 10.31, 143.4, "LDN paper / authors' code"),
    ("ladder-dn169", "authors", "reference", 16.34, 152.6, "LDN paper"),
    ("ladder-dn161", "authors", "reference", 31.24, 299.3, "LDN paper"),
    ("deeplabv3plus-rn50", "paper", {}, NAN, NAN, ""),
    ("deeplabv3plus-rn101", "paper", {}, NAN, NAN, ""),
    ("deeplabv3plus-rn101", "1 conv", "reference", 58.75, 632.0, "VainF port, OS 16"),
    ("deeplabv3plus-rn101", "1 conv os8", {"decoder_convs": 1, "output_stride": 8}, 58.75, 2004.0, "VainF port, OS 8"),
    ("refinenet-rn101", "paper", {}, NAN, NAN, ""),
    ("refinenet-rn101", "crp 4", "reference", 118.05, 2103.0, "DrSleep port (4-stage CRP)"),
    ("dupsampling-rn50", "paper", {}, NAN, NAN, "(paper gives relative cost only)"),
    ("dynamic-routing-l16", "raw", {}, NAN, 119.5, "paper, all gates open; repo 114.9"),
    ("swiftnet-rn18", "single scale", {}, 11.8, 104.0, "SwiftNet paper; authors' code 11.80 M / 103.6"),
    ("swiftnet-lite0", "Lite0", {}, NAN, NAN, ""),
    ("swiftnet-lite1", "Lite1", {}, NAN, NAN, ""),
    ("swiftnet-lite2", "Lite2", {}, NAN, NAN, ""),
]


def main() -> None:
    missing = {s.name for s in list_archs()} - {r[0] for r in ROWS}
    rows = ROWS + [(name, "default", {}, NAN, NAN, "") for name in sorted(missing)]
    print(f"{'model':<24} {'config':<10} {'input':<9} {'params M':>9} {'GMACs':>8} {'pub. M':>7} {'pub. G':>7} "
          f"{'ratio M':>8} {'ratio G':>8}  source")
    for name, label, config, pm, pg, source, *size in rows:
        h, w, classes = size[0] if size else (1024, 2048, 19)
        if config == "reference":
            config = get_arch(name).reference
        with torch.device("meta"):
            model = create_model(name, classes, **config)
        params = count_parameters(model) / 1e6
        macs = count_macs(model.eval(), h, w) / 1e9
        print(f"{name:<24} {label:<10} {h}x{w:<5} {params:9.2f} {macs:8.1f} {pm:7.2f} {pg:7.1f} "
              f"{params / pm:8.3f} {macs / pg:8.3f}  {source}")


if __name__ == "__main__":
    main()
