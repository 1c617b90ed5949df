"""Which bands feed the model, and how raw values map to the model's 0..255 input range.

Rescale rule (deterministic, documented in the README): uint8 is used as is. Any other type is
mapped linearly per band from [low, high] to [0, 255] and clipped, where low/high are the 2nd and
98th percentiles of that band's valid pixels in a decimated view of the whole image (at most
1024 pixels on the long side, nearest-neighbour sampling, so the same file gives the same numbers).
`--value-range LOW,HIGH` replaces the percentiles for every band.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from bigseg.errors import InputError

PERCENTILES = (2.0, 98.0)
SAMPLE_SIDE = 1024


@dataclass(frozen=True)
class BandPlan:
    """`indexes`: 1-based bands read from the file; `palette`: colour table expanding one index
    band to RGB; `replicate`: copy one band to this many channels; `notes`: what was decided."""

    indexes: tuple[int, ...]
    palette: np.ndarray | None = None
    replicate: int = 1
    notes: tuple[str, ...] = ()

    @property
    def channels(self) -> int:
        return 3 if self.palette is not None else len(self.indexes) * self.replicate


def parse_bands(text: str | None) -> tuple[int, ...] | None:
    if not text:
        return None
    try:
        bands = tuple(int(b) for b in text.replace(" ", "").split(","))
    except ValueError:
        raise InputError(f"takes 1-based band numbers like 1,2,3, got {text!r}", param="bands") from None
    if any(b < 1 for b in bands):
        raise InputError(f"are 1-based, got {text!r}", param="bands")
    return bands


def plan_bands(name: str, count: int, alpha: int | None, palette: np.ndarray | None,
               wanted: int | None, bands: tuple[int, ...] | None, rgb: tuple[int, int, int] | None = None
               ) -> BandPlan:
    """Choose bands for a model taking `wanted` channels from a file with `count` bands (None:
    every image band, as a model is trained on them: a colour table expands to RGB).

    `rgb`: the bands the file labels red, green and blue, used in that order for 3-band models
    (some files store B,G,R).
    """
    if bands is not None:
        bad = [b for b in bands if b > count]
        if bad:
            raise InputError(f"asks for band {bad[0]} but {name} has {count}", param="bands")
        if wanted is not None and len(bands) != wanted:
            raise InputError(f"chooses {len(bands)} band(s) but the model takes {wanted}", param="bands")
        return BandPlan(bands)
    content = [b for b in range(1, count + 1) if b != alpha]
    if wanted is None:
        wanted = 3 if len(content) == 1 and palette is not None or len(content) == 3 and rgb is not None \
            else len(content)
    if wanted == 3 and rgb is not None:
        note = () if len(content) == 3 and tuple(content) == rgb else (
            f"using bands {','.join(map(str, rgb))} (labelled red, green, blue) of {count}",)
        return BandPlan(rgb, notes=note)
    if len(content) == 1 and palette is not None and wanted == 3:
        return BandPlan((content[0],), palette=palette, notes=("expanded the colour table to RGB",))
    if len(content) == wanted:
        return BandPlan(tuple(content))
    if len(content) == 1:
        return BandPlan((content[0],), replicate=wanted,
                        notes=(f"single band repeated to the model's {wanted} bands",))
    if len(content) > wanted:
        chosen = tuple(content[:wanted])
        return BandPlan(chosen, notes=(f"using bands {','.join(map(str, chosen))} of {count}; "
                                       f"pass --bands to choose",))
    raise InputError(f"{name} has {len(content)} image band(s) but the model takes {wanted}; "
                     f"use a model trained on {len(content)} band(s)")


def apply_plan(plan: BandPlan, data: np.ndarray) -> np.ndarray:
    """(bands, h, w) as read -> (channels, h, w) float32."""
    if plan.palette is not None:
        idx = np.clip(data[0].astype(np.int64), 0, len(plan.palette) - 1)
        return np.moveaxis(plan.palette[idx][..., :3], -1, 0).astype(np.float32)
    data = data.astype(np.float32, copy=False)
    return np.repeat(data, plan.replicate, 0) if plan.replicate > 1 else data


def parse_value_range(text: str | None) -> tuple[float, float] | None:
    if not text:
        return None
    try:
        low, high = (float(v) for v in text.split(","))
    except ValueError:
        raise InputError(f"takes LOW,HIGH, got {text!r}", param="value_range") from None
    if not high > low:
        raise InputError(f"needs HIGH > LOW, got {text!r}", param="value_range")
    return low, high


def value_scale(dtype: np.dtype, sample: np.ndarray | None, valid: np.ndarray | None,
                value_range: tuple[float, float] | None) -> tuple[np.ndarray, np.ndarray] | None:
    """Per-channel (offset, gain) so that (x - offset) * gain is in 0..255; None for uint8 as is."""
    if value_range is not None:
        low, high = value_range
        return np.float32(low), np.float32(255.0 / (high - low))
    if np.dtype(dtype) == np.uint8:
        return None
    lows, gains = [], []
    for band in sample:
        values = band[valid] if valid is not None else band.ravel()
        values = values[np.isfinite(values)]
        if values.size == 0:
            lows.append(0.0), gains.append(1.0)
            continue
        low, high = np.percentile(values.astype(np.float64), PERCENTILES)
        lows.append(low)
        gains.append(255.0 / (high - low) if high > low else 1.0)
    return (np.array(lows, np.float32)[:, None, None], np.array(gains, np.float32)[:, None, None])


def rescale(data: np.ndarray, scale) -> np.ndarray:
    if scale is None:
        return data
    offset, gain = scale
    with np.errstate(over="ignore", invalid="ignore"):  # nodata sentinels like -3.4e38
        return np.clip((data - offset) * gain, 0, 255)
