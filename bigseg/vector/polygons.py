"""Polygons of a class mask of any size, strip by strip, in bounded memory.

Each strip of rows is polygonised by GDAL (`rasterio.features.shapes`, in pixel coordinates, so
every vertex is an exact integer). A piece that touches neither the strip's top nor its bottom
cut is a whole region and leaves at once. Pieces that touch a cut are held; the next strip's
pieces of the same class that share an edge of the cut with them (4-connectivity) or a corner
(8-connectivity) join their region, and a region leaves once none of its pieces touches the
newest cut. Its pieces are then unioned: the polygon (with its holes) is the one polygonising the
whole mask at once gives, up to the order of vertices. Only regions still open at the current cut
are held: memory grows with their outlines, not with the mask's area (a single region spanning the
whole mask holds pieces along its whole extent; `max_open_vertices` bounds it by a clear error).

8-connected regions: pixels that touch only at a corner are one region. GDAL writes such a region
as one polygon whose ring touches itself, which is not a valid OGC polygon; here it is a valid
MultiPolygon whose parts meet at those corners (`shapely.make_valid` of GDAL's).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator

import numpy as np

from bigseg.errors import InputError
from bigseg.palette import NODATA


@dataclass
class Region:
    """One connected region of a class: its pieces (shapely polygons, pixel coordinates)."""

    value: int
    pieces: list = field(default_factory=list)
    bottom: list = field(default_factory=list)  # the pieces touching the newest cut

    def geometry(self):
        import shapely

        geom = self.pieces[0] if len(self.pieces) == 1 else shapely.union_all(self.pieces)
        return shapely.make_valid(geom) if not geom.is_valid else geom


class StreamingPolygons:
    """Feed strips top to bottom with `add(labels, row_off, valid)`; each call yields the regions
    it finished as (class value, geometry in pixel coordinates); `finish()` yields the rest.

    `connectivity`: 4 or 8; `keep`: class values to polygonise (None: all); `nodata`: a value that is
    never a region (besides pixels `valid` marks False)."""

    def __init__(self, width: int, height: int, connectivity: int = 4, keep: set[int] | None = None,
                 nodata: int | None = NODATA, max_open_vertices: int = 50_000_000):
        if connectivity not in (4, 8):
            raise InputError(f"must be 4 or 8, got {connectivity}", param="connectivity")
        self.width, self.height, self.connectivity = width, height, connectivity
        self.keep, self.nodata, self.max_open_vertices = keep, nodata, max_open_vertices
        self.open: list[Region] = []  # regions touching the last strip's bottom cut
        self.cut = 0                   # the row of that cut
        self.open_vertices = 0

    def add(self, labels: np.ndarray, row_off: int, valid: np.ndarray | None = None) -> Iterator[tuple[int, object]]:
        """Polygonise the strip `labels` (h, width) whose first row is `row_off` (the previous
        strip's last row + 1)."""
        from rasterio.features import shapes
        from rasterio.transform import Affine
        from shapely.geometry import shape

        if row_off != self.cut:
            raise ValueError(f"strips must come in order: expected row {self.cut}, got {row_off}")
        h = labels.shape[0]
        mask = np.ones(labels.shape, bool) if valid is None else valid.astype(bool)
        if self.nodata is not None:
            mask &= labels != self.nodata
        if self.keep is not None:
            mask &= np.isin(labels, list(self.keep))
        top, bottom = row_off, row_off + h
        pieces = [(int(v), shape(g)) for g, v in
                  shapes(labels.astype(np.int32) if labels.dtype not in (np.uint8, np.int16, np.int32, np.uint16,
                                                                          np.float32) else labels,
                         mask=mask, connectivity=self.connectivity, transform=Affine.translation(0, row_off))]
        if self.connectivity == 8:  # GDAL's self-touching rings as valid (multi)polygons
            import shapely

            pieces = [(v, g if g.is_valid else shapely.make_valid(g)) for v, g in pieces]
        touching = self._join(pieces, top)
        self.cut = bottom
        yield from self._settle(touching, bottom)

    def finish(self) -> Iterator[tuple[int, object]]:
        """The regions still open at the last cut (the mask's bottom edge)."""
        for region in self.open:
            yield region.value, region.geometry()
        self.open, self.open_vertices = [], 0

    def _join(self, pieces: list[tuple[int, object]], top: int) -> list[Region]:
        """Regions of this strip: each piece joined to the open regions it touches across the cut at
        `top` (several open regions joined by one piece become one)."""
        import shapely

        regions = [Region(v, [g], [g]) for v, g in pieces]
        if not self.open or top == 0:
            return regions
        held = [(r, p) for r in self.open for p in r.bottom]
        tree = shapely.STRtree([p for _, p in held])
        parent = list(range(len(regions) + len(self.open)))  # union-find over new regions then open ones
        index = {id(r): len(regions) + i for i, r in enumerate(self.open)}

        def find(i: int) -> int:
            while parent[i] != i:
                parent[i] = parent[parent[i]]
                i = parent[i]
            return i
        for i, region in enumerate(regions):
            piece = region.pieces[0]
            if piece.bounds[1] > top:  # does not reach the cut
                continue
            for k in tree.query(piece):
                other, held_piece = held[k]
                if other.value == region.value and self._touch(piece, held_piece, top):
                    parent[find(i)] = find(index[id(other)])
        groups: dict[int, Region] = {}
        for i, region in enumerate(regions + self.open):
            root = find(i)
            if root not in groups:
                groups[root] = Region(region.value)
            groups[root].pieces += region.pieces
            if i < len(regions):  # only this strip's pieces can touch the next cut
                groups[root].bottom += region.pieces
        return list(groups.values())

    def _touch(self, a, b, cut: int) -> bool:
        """Whether two pieces on either side of the cut row `cut` are one region: they share a
        stretch of the cut (4-connectivity) or at least a point of it (8)."""
        shared = a.boundary.intersection(b.boundary)
        if shared.is_empty:
            return False
        return self.connectivity == 8 or shared.length > 0

    def _settle(self, regions: list[Region], bottom: int) -> Iterator[tuple[int, object]]:
        """Finished regions leave; those with a piece on the new cut stay open."""
        self.open, self.open_vertices = [], 0
        for region in regions:
            region.bottom = [p for p in region.bottom if p.bounds[3] >= bottom]
            if region.bottom and bottom < self.height:
                self.open.append(region)
                self.open_vertices += sum(_vertices(p) for p in region.pieces)
            else:
                yield region.value, region.geometry()
        if self.open_vertices > self.max_open_vertices:
            raise InputError(f"regions still open at row {bottom} hold {self.open_vertices} vertices (over "
                             f"{self.max_open_vertices}): a few regions span most of the mask; keep fewer classes "
                             f"(those regions' class out) or polygonise a coarser mask", param="vector")


def _vertices(geom) -> int:
    import shapely

    return int(shapely.get_num_coordinates(geom))
