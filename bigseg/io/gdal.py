"""The GDAL settings every bigseg job runs under (entered once per job, around readers and writers)."""
from __future__ import annotations

import os

GDAL_CACHE_MB = 64  # GDAL's default is 5% of RAM, which would make memory grow with image size


def gdal_env():
    """A rasterio environment: a bounded block cache and masks stored inside the TIFF."""
    import rasterio

    mb = int(os.environ.get("GDAL_CACHEMAX", GDAL_CACHE_MB))
    # rasterio hands an integer GDAL_CACHEMAX to GDAL in bytes (64 would be a 64-byte cache, and
    # every decimated or windowed read would decode its blocks again); values below 100000 are
    # megabytes, as GDAL itself reads the option
    return rasterio.Env(GDAL_CACHEMAX=mb * 2 ** 20 if mb < 100_000 else mb,
                        GDAL_TIFF_INTERNAL_MASK=True)
