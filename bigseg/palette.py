"""Class colours for any number of classes (the PASCAL VOC bit-interleaved colour map), and the
one label value that is no class."""
from __future__ import annotations

NODATA = 255  # the label of pixels without valid input, in every mask bigseg writes and counts


def default_palette(n: int) -> list[list[int]]:
    """The PASCAL VOC bit-interleaved colour map: distinct colours for any number of classes."""
    palette = []
    for i in range(n):
        r = g = b = 0
        c = i
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        palette.append([r, g, b])
    return palette
