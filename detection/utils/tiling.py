"""Where the tiles of an image go (test.tiles at test time, tools/make_tiles.py for training):
one rule for both, so a model trained on tiles sees its objects at the scale it is tested at."""
from __future__ import annotations


def tile_starts(length: int, size: int, overlap: float) -> list[int]:
    """Where the tiles start along one side of `length` pixels: every size x (1 - overlap)
    pixels (rounded), the last moved in to end at the edge; [0] when one tile covers it."""
    if length <= size:
        return [0]
    stride = max(1, round(size * (1 - overlap)))
    starts = list(range(0, length - size, stride))
    return starts + [length - size]


def tile_windows(height: int, width: int, size: int, overlap: float) -> list[tuple[int, int, int, int]]:
    """The tiles of an image, as (x0, y0, x1, y1) pixel windows (x1, y1 exclusive), row by row."""
    return [(x, y, min(x + size, width), min(y + size, height))
            for y in tile_starts(height, size, overlap) for x in tile_starts(width, size, overlap)]
