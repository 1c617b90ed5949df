"""Parameters and multiply-adds (the LDN lab's "GFLOPs") of each registered architecture at
1024x2048, in the default and the authors' configuration, beside the published figures.

    python benchmarks/model_complexity.py
"""
from __future__ import annotations

import torch

from bigseg.models import create_model, list_archs
from bigseg.models.complexity import count_macs, count_parameters

PUBLISHED = {  # (params M, GMACs at 1024x2048), ../shared/MODELS.md
    "ladder-dn121": (10.31, 143.4), "ladder-dn169": (16.34, 152.6), "ladder-dn161": (31.24, 299.3),
}


def main() -> None:
    print(f"{'model':<14} {'config':<8} {'params M':>9} {'GMACs':>8} {'paper M':>8} {'paper G':>8} {'ratio M':>8} {'ratio G':>8}")
    for spec in list_archs():
        for label, config in (("default", {}), ("authors", spec.reference)):
            with torch.device("meta"):
                model = create_model(spec.name, 19, **config)
            params = count_parameters(model) / 1e6
            macs = count_macs(model, 1024, 2048) / 1e9
            pm, pg = PUBLISHED.get(spec.name, (float("nan"), float("nan")))
            print(f"{spec.name:<14} {label:<8} {params:9.2f} {macs:8.1f} {pm:8.2f} {pg:8.1f} "
                  f"{params / pm:8.3f} {macs / pg:8.3f}")


if __name__ == "__main__":
    main()
