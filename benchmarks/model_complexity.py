"""Parameters and multiply-adds ("GFLOPs" as these papers count them) of each registered
architecture at 1024x2048 and 19 classes, in the default and the reference configuration,
beside the published figures (../shared/MODELS.md; nan where none is published).

    python benchmarks/model_complexity.py
"""
from __future__ import annotations

import math

import torch

from bigseg.models import create_model, get_arch, list_archs
from bigseg.models.complexity import count_macs, count_parameters

NAN = math.nan
# (name, label, config or "reference", published params M, published GMACs, source)
ROWS = [
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
]


def main() -> None:
    missing = {s.name for s in list_archs()} - {r[0] for r in ROWS}
    rows = ROWS + [(name, "default", {}, NAN, NAN, "") for name in sorted(missing)]
    print(f"{'model':<20} {'config':<11} {'params M':>9} {'GMACs':>8} {'pub. M':>7} {'pub. G':>7} "
          f"{'ratio M':>8} {'ratio G':>8}  source")
    for name, label, config, pm, pg, source in rows:
        if config == "reference":
            config = get_arch(name).reference
        with torch.device("meta"):
            model = create_model(name, 19, **config)
        params = count_parameters(model) / 1e6
        macs = count_macs(model, 1024, 2048) / 1e9
        print(f"{name:<20} {label:<11} {params:9.2f} {macs:8.1f} {pm:7.2f} {pg:7.1f} "
              f"{params / pm:8.3f} {macs / pg:8.3f}  {source}")


if __name__ == "__main__":
    main()
