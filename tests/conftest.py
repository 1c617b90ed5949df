"""Shared fixtures: a tiny ladder model, its checkpoint, and synthetic rasters made in tmp_path."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from bigseg.checkpoint import from_model, save_checkpoint
from bigseg.models import create_model

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"

TINY = dict(densenet=dict(growth_rate=4, block_config=[1, 2, 2, 1], num_init_features=8, bn_size=2),
            spp_bottleneck=8, spp_level=4, spp_width=8, up_widths=[8, 8, 8, 8], squeeze=8)
CLASSES = ["sky", "road", "car"]


def tiny_model(num_classes: int = 3, in_channels: int = 3, seed: int = 0):
    torch.manual_seed(seed)
    return create_model("ladder-dn121", num_classes, in_channels, **TINY)


@pytest.fixture
def tiny_checkpoint(tmp_path) -> Path:
    model = tiny_model()
    # a non-trivial running mean/var so eval-mode batchnorm does something
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    return save_checkpoint(from_model(model, "ladder-dn121", CLASSES, training={"note": "test"}),
                           tmp_path / "tiny.pt")


def write_geotiff(path: Path, width: int, height: int, count: int = 3, dtype="uint8", nodata=None,
                  seed: int = 0, tiled: bool = True, crs: str = "EPSG:32633", data: np.ndarray | None = None,
                  **extra) -> Path:
    import rasterio
    from rasterio.transform import from_origin

    rng = np.random.default_rng(seed)
    if data is None:
        data = rng.integers(0, 255, (count, height, width)).astype(dtype)
    profile = dict(driver="GTiff", width=width, height=height, count=count, dtype=dtype, crs=crs,
                   transform=from_origin(500000.0, 4000000.0, 0.5, 0.5), nodata=nodata, **extra)
    if tiled:
        profile.update(tiled=True, blockxsize=256, blockysize=256)
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(data)
    return path


@pytest.fixture
def shared_data() -> Path:
    if not SHARED.is_dir():
        pytest.skip("../shared/data is not present")
    return SHARED
