"""The GDAL settings every bigseg job runs under (entered once per job, around readers and writers)."""
from __future__ import annotations

import os

GDAL_CACHE_MB = 64  # GDAL's default is 5% of RAM, which would make memory grow with image size


def gdal_env(threads: int = 1):
    """A rasterio environment: a bounded block cache, masks stored inside the TIFF, and with
    `threads` > 1 GDAL's worker threads: a windowed read decodes the blocks it spans in parallel
    (GeoTIFF, GDAL >= 3.6) and a GeoTIFF's blocks are compressed in parallel as they are written."""
    import rasterio

    mb = int(os.environ.get("GDAL_CACHEMAX", GDAL_CACHE_MB))
    options = {
        # rasterio hands an integer GDAL_CACHEMAX to GDAL in bytes (64 would be a 64-byte cache, and
        # every decimated or windowed read would decode its blocks again); values below 100000 are
        # megabytes, as GDAL itself reads the option
        "GDAL_CACHEMAX": mb * 2 ** 20 if mb < 100_000 else mb,
        "GDAL_TIFF_INTERNAL_MASK": True,
    }
    if threads > 1:
        options["GDAL_NUM_THREADS"] = str(threads)
    return rasterio.Env(**options)
