"""Dense CRF settings (no torch: the CLI checks them before loading anything)."""
from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace

from bigseg.errors import InputError


@dataclass(frozen=True)
class CRFParams:
    """DeepLab v2 (ResNet-101) released defaults: bi_w 4, bi_xy_std 67, bi_rgb_std 3, pos_w 3, pos_xy_std 1."""

    w1: float = 4.0
    theta_alpha: float = 67.0
    theta_beta: float = 3.0
    w2: float = 3.0
    theta_gamma: float = 1.0
    iterations: int = 10
    backend: str = "lattice"  # lattice | window
    radius: int = 5           # window back-end: kernel radius on the (downsampled) grid
    downsample: int = 1       # window back-end: grid step for the appearance kernel

    @property
    def reach(self) -> int:
        """Pixels one iteration of the window back-end carries information (appearance or smoothness)."""
        return max(self.radius * self.downsample, math.ceil(3 * self.theta_gamma))


def parse_crf(backend: str | None, params: str | None = None) -> CRFParams | None:
    """`--crf lattice|window` and `--crf-params w1=4,theta_alpha=67,...` to CRFParams (None: off)."""
    if backend is None:
        if params:
            raise InputError("needs a back-end (lattice or window) to apply to", param="crf_params")
        return None
    if backend not in ("lattice", "window"):
        raise InputError(f"takes lattice or window, got {backend!r}", param="crf")
    p = CRFParams(backend=backend)
    types = {f.name: f.type for f in fields(CRFParams)}
    for item in filter(None, (params or "").replace(" ", "").split(",")):
        key, _, value = item.partition("=")
        if key not in types or key == "backend":
            raise InputError(f"unknown {key!r}; known: "
                             f"{', '.join(k for k in types if k != 'backend')}", param="crf_params")
        try:
            p = replace(p, **{key: (int if types[key] in (int, "int") else float)(value)})
        except ValueError:
            raise InputError(f"{key} needs a number, got {value!r}", param="crf_params") from None
    return p
