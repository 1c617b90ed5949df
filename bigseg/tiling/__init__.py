"""Tiles: the grid geometry (`geometry`: windows, the tile grid, the blend window and the overlap
rule; numpy only) and the streaming stitcher (`stitch`: tiles read, predicted in batches, blended
and handed out as finished rectangles). Knows arrays and windows, never models or torch."""
