"""Splits of raster scenes that do not leak: validation pixels are never inside a training window.

- Explicit: each scene's split (a scenes file's `split` column, or `images/<split>/` folders), or
  `--val-scenes NAME,...`.
- Two scenes or more: by whole scenes. With ten or more, every tenth scene by name (the generic
  layout's rule); with fewer, the one scene whose area is closest to a fifth of the total.
- One scene: by spatial blocks. The scene is cut into square blocks of `block` pixels; every fifth
  block in a fixed shuffled order is validation. Training regions are the other blocks, each cut
  back by `buffer` pixels on every side that touches a validation block, so no training window
  (which always lies inside one training region) reaches within `buffer` of a validation pixel.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from bigseg.errors import DatasetError
from bigseg.tiling.geometry import Window
from bigseg.train.data.source import Region

VAL_SHARE = 5         # one block in five (one scene in ten) is validation
SPLIT_SEED = 20260    # blocks are shuffled by a fixed seed: the split does not change with --seed


@dataclass(frozen=True)
class SplitSettings:
    """`val_scenes`: scene names (image stems) for validation; `block` and `buffer`: the block
    side and the gap, in pixels, of a one-scene split."""

    val_scenes: tuple[str, ...] = ()
    block: int = 1024
    buffer: int = 64


def split_scenes(names: list[str], sizes: list[tuple[int, int]], explicit: list[str | None],
                 settings: SplitSettings) -> tuple[dict[str, list[Region] | DatasetError], str]:
    """Regions per split name, and how the split was made (one line for the user). A single scene
    too small for two blocks is all training, and its `val` is the error that says why."""
    n = len(names)
    if settings.val_scenes:
        unknown = sorted(set(settings.val_scenes) - set(names))
        if unknown:
            raise DatasetError(f"no scene named {unknown[0]!r} (scenes: {', '.join(names[:8])}"
                               f"{', ...' if n > 8 else ''})", param="val_scenes")
        chosen = set(settings.val_scenes)
        if len(chosen) == n:
            raise DatasetError("names every scene; keep at least one for training", param="val_scenes")
        return _by_scene(["val" if name in chosen else "train" for name in names]), \
            f"validation scenes (--val-scenes): {', '.join(sorted(chosen))}"
    if any(e is not None for e in explicit):
        splits = [e or "train" for e in explicit]
        return _by_scene(splits), "splits as given: " + ", ".join(
            f"{s} {splits.count(s)} scene(s)" for s in sorted(set(splits)))
    if n >= 2:
        if n >= 2 * VAL_SHARE:
            val = {i for i in range(n) if i % (2 * VAL_SHARE) == 2 * VAL_SHARE - 1}
        else:
            areas = np.array([w * h for w, h in sizes], np.float64)
            gaps = np.abs(areas - areas.sum() / VAL_SHARE)
            val = {max(i for i in range(n) if gaps[i] == gaps.min())}  # ties: the later name
        return _by_scene(["val" if i in val else "train" for i in range(n)]), \
            f"validation by whole scenes: {', '.join(names[i] for i in sorted(val))} of {n}"
    try:
        regions = block_split(*sizes[0], settings.block, settings.buffer)
    except DatasetError as e:  # too small to split: all of it trains, and validation says why there is none
        return {"train": [Region(0)], "val": e}, f"one scene, not split: {e}"
    return regions, (f"one scene: validation on {len(regions['val'])} blocks of {settings.block} px, training "
                     f"on {len(regions['train'])} blocks at least {settings.buffer} px from them")


def _by_scene(splits: list[str]) -> dict[str, list[Region]]:
    out: dict[str, list[Region]] = {}
    for i, s in enumerate(splits):
        out.setdefault(s, []).append(Region(i))
    return out


def block_split(width: int, height: int, block: int, buffer: int) -> dict[str, list[Region]]:
    """Blocks of one scene (item 0): every fifth in a fixed shuffled order for validation, the
    rest for training cut back by `buffer` where they touch a validation block (diagonally too)."""
    if block < 64:
        raise DatasetError(f"must be at least 64 pixels, got {block}", param="val_block")
    if buffer < 0:
        raise DatasetError(f"must be 0 or more pixels, got {buffer}", param="val_buffer")
    rows, cols = -(-height // block), -(-width // block)
    if rows * cols < 2:
        raise DatasetError(f"{block} makes the scene ({width}x{height}) one block: it cannot be split into "
                           f"training and validation; use a smaller --val-block or a second scene",
                           param="val_block")
    order = np.random.default_rng(SPLIT_SEED).permutation(rows * cols)
    is_val = np.zeros((rows, cols), bool)
    is_val.flat[order[:max(1, rows * cols // VAL_SHARE)]] = True
    out: dict[str, list[Region]] = {"train": [], "val": []}
    for r in range(rows):
        for c in range(cols):
            y0, x0 = r * block, c * block
            y1, x1 = min(height, y0 + block), min(width, x0 + block)
            if is_val[r, c]:
                out["val"].append(Region(0, Window(x0, y0, x1 - x0, y1 - y0)))
                continue
            near = lambda dr, dc: 0 <= r + dr < rows and 0 <= c + dc < cols and is_val[r + dr, c + dc]
            top = y0 + buffer * any(near(-1, dc) for dc in (-1, 0, 1))
            bottom = y1 - buffer * any(near(1, dc) for dc in (-1, 0, 1))
            left = x0 + buffer * any(near(dr, -1) for dr in (-1, 0, 1))
            right = x1 - buffer * any(near(dr, 1) for dr in (-1, 0, 1))
            if bottom - top >= 16 and right - left >= 16:
                out["train"].append(Region(0, Window(left, top, right - left, bottom - top)))
    if not out["train"]:
        raise DatasetError(f"a buffer of {buffer} px leaves no training block of {block} px", param="val_buffer")
    return out
