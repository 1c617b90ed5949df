"""STAC items as inputs: a STAC item (a local JSON file or a URL) stands for one of its assets, read
like any raster (remote ones window by window, `bigseg.io.remote`), and its id names the outputs.
Items are read with pystac (`pip install 'bigseg[stac]'`).

The asset is `--asset NAME` when given, else the item's `visual` asset, else the first asset whose
roles include `visual`, else its only GeoTIFF asset; an item with several GeoTIFFs and none of these
is one line that lists them.
"""
from __future__ import annotations

import re

from bigseg.errors import InputError, first_line

TIFF = re.compile(r"tiff|geotiff|cloud-optimized", re.I)


def is_stac_item(text: str) -> bool:
    """Whether an input is named as a STAC item (a .json file or URL; read to tell for sure)."""
    return re.sub(r"[?#].*$", "", str(text)).lower().endswith(".json")


def stac_asset(source: str, asset: str | None = None) -> tuple[str, str]:
    """(the asset's href, absolute: a path or URL; the item's id) of the STAC item at `source`."""
    try:
        import pystac
    except ImportError:
        raise InputError(f"{source}: reading STAC items needs pystac: pip install 'bigseg[stac]'") from None
    try:
        item = pystac.Item.from_file(source)
    except Exception as e:  # pystac's, urllib's and json's own errors
        raise InputError(f"{source}: not a readable STAC item ({first_line(e)})") from None
    key = _choose(item, asset, source)
    return item.assets[key].get_absolute_href() or item.assets[key].href, item.id


def _choose(item, asset: str | None, source: str) -> str:
    assets = item.assets
    if asset is not None:
        if asset not in assets:
            raise InputError(f"{source} has no asset {asset!r}; it has {', '.join(assets)}", param="asset")
        return asset
    if "visual" in assets:
        return "visual"
    visual = [k for k, a in assets.items() if "visual" in (a.roles or [])]
    if visual:
        return visual[0]
    rasters = [k for k, a in assets.items() if TIFF.search(a.media_type or "") or
               re.sub(r"[?#].*$", "", a.href).lower().endswith((".tif", ".tiff"))]
    if len(rasters) == 1:
        return rasters[0]
    raise InputError(f"{source}: choose its asset with --asset ({', '.join(rasters or assets)})", param="asset")
