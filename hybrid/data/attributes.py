"""The procedural dataset's vocabulary: every discrete attribute a prompt can name.

Shared by the dataset (which draws and renders them), the captions (which name them) and the
oracle (which predicts them). Index 0.. of each list is the attribute's integer id.
"""

from __future__ import annotations

from collections.abc import Iterable

# Object kinds. "glyph" objects carry a character from GLYPHS; the rest are geometric shapes.
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "diamond", "star", "cross", "glyph")
COLORS: tuple[str, ...] = ("red", "green", "blue", "yellow", "purple", "orange")
# 3x3 grid, row-major; the caption words for each cell.
POSITIONS: tuple[str, ...] = (
    "top left", "top", "top right",
    "left", "center", "right",
    "bottom left", "bottom", "bottom right",
)
SIZES: tuple[str, ...] = ("small", "large")
BACKGROUNDS: tuple[str, ...] = ("black", "gray", "white")
FILLS: tuple[str, ...] = ("solid", "striped", "dotted", "checkered")
# A-Z and 0-9 less the pairs that Pillow's default font renders (nearly) alike at small sizes:
# O/0 (kept O), I/1 (kept I). "none" (id 0) is the glyph attribute of non-glyph objects.
# Checked with the procedural renderer at 32x32: the closest remaining pairs by pixel distance
# (S/3, S/8, 3/8, 6/8, C/O) were all told apart by a small CNN (glyph accuracy 100% on ~9k
# fresh glyph images), so nothing else is dropped.
GLYPHS: tuple[str, ...] = ("none",) + tuple("ABCDEFGHIJKLMNOPQRSTUVWXYZ23456789")

ATTRIBUTES: dict[str, tuple[str, ...]] = {
    "shape": SHAPES,
    "color": COLORS,
    "position": POSITIONS,
    "size": SIZES,
    "background": BACKGROUNDS,
    "fill": FILLS,
    "glyph": GLYPHS,
}

NUM_CLASSES = len(SHAPES) * len(COLORS)


def class_id(shape: int, color: int) -> int:
    """Class id of an object: shape-major, `shape * len(COLORS) + color`."""
    return shape * len(COLORS) + color


def class_name(cid: int) -> str:
    """'red triangle' for a class id; raises ValueError naming the valid range."""
    if not 0 <= cid < NUM_CLASSES:
        raise ValueError(f"class id {cid} is out of range 0..{NUM_CLASSES - 1}")
    shape, color = divmod(cid, len(COLORS))
    return f"{COLORS[color]} {SHAPES[shape]}"


def parse_holdout(holdout: Iterable[str]) -> frozenset[tuple[int, int]]:
    """`["red:triangle", ...]` -> {(shape id, color id), ...}; raises ValueError naming a bad entry."""
    pairs = set()
    for item in holdout:
        parts = str(item).strip().lower().split(":")
        if len(parts) != 2:
            raise ValueError(f"holdout entry {item!r} is not of the form 'color:shape' (e.g. 'red:triangle')")
        color, shape = (p.strip() for p in parts)
        if color not in COLORS:
            raise ValueError(f"holdout entry {item!r}: unknown color {color!r}; colors are {', '.join(COLORS)}")
        if shape not in SHAPES:
            raise ValueError(f"holdout entry {item!r}: unknown shape {shape!r}; shapes are {', '.join(SHAPES)}")
        pairs.add((SHAPES.index(shape), COLORS.index(color)))
    return frozenset(pairs)
