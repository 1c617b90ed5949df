"""The GDAL settings every bigseg job runs under (entered once per job, around readers and writers)."""
from __future__ import annotations

import os

GDAL_CACHE_MB = 64  # GDAL's default is 5% of RAM, which would make memory grow with image size


def gdal_env():
    """A rasterio environment: a bounded block cache and masks stored inside the TIFF."""
    import rasterio

    return rasterio.Env(GDAL_CACHEMAX=int(os.environ.get("GDAL_CACHEMAX", GDAL_CACHE_MB)),
                        GDAL_TIFF_INTERNAL_MASK=True)
