"""ShapeWorld's shape kinds: the cell pattern each is drawn with and how a blob is classified back.

Each shape has one fixed template (a set of cells), sized to read clearly in a 16×16 grid. The
templates are pairwise at least 4 cells apart in Hamming distance under the best alignment, so a
blob within ``tolerance`` = 1 cell of a template can only be that shape.
"""

from __future__ import annotations

from collections.abc import Iterable

Cell = tuple[int, int]

_TEMPLATE_ART: dict[str, tuple[str, ...]] = {
    "square": (
        "####",
        "####",
        "####",
        "####",
    ),
    "circle": (
        ".###.",
        "#####",
        "#####",
        "#####",
        ".###.",
    ),
    "triangle": (
        "...#...",
        "..###..",
        ".#####.",
        "#######",
    ),
    "cross": (
        "..#..",
        "..#..",
        "#####",
        "..#..",
        "..#..",
    ),
    "diamond": (
        "..#..",
        ".###.",
        "#####",
        ".###.",
        "..#..",
    ),
}

SHAPES: tuple[str, ...] = tuple(_TEMPLATE_ART)
PLURALS: dict[str, str] = {"square": "squares", "circle": "circles", "triangle": "triangles",
                           "cross": "crosses", "diamond": "diamonds"}  # fmt: skip
UNKNOWN = "unknown"


def _cells(art: tuple[str, ...]) -> frozenset[Cell]:
    return frozenset((r, c) for r, line in enumerate(art) for c, ch in enumerate(line) if ch == "#")


TEMPLATES: dict[str, frozenset[Cell]] = {name: _cells(art) for name, art in _TEMPLATE_ART.items()}
TEMPLATE_SIZES: dict[str, tuple[int, int]] = {
    name: (len(art), len(art[0])) for name, art in _TEMPLATE_ART.items()
}


def check_shape(name: str) -> str:
    if name not in TEMPLATES:
        raise ValueError(f"unknown shape {name!r}; expected one of {list(SHAPES)}")
    return name


def normalize_cells(cells: Iterable[Cell]) -> tuple[frozenset[Cell], int, int]:
    """The cells moved so their bounding box starts at (0, 0), with the box's height and width."""
    cells = list(cells)
    if not cells:
        raise ValueError("a blob needs at least one cell")
    r0 = min(r for r, _ in cells)
    c0 = min(c for _, c in cells)
    moved = frozenset((r - r0, c - c0) for r, c in cells)
    return moved, max(r for r, _ in moved) + 1, max(c for _, c in moved) + 1


def _best_alignment(a: frozenset[Cell], b: frozenset[Cell], max_shift: int | None = None) -> tuple[int, Cell]:
    """The smallest Hamming distance between ``a`` and ``b`` shifted by ``(dy, dx)``, and the first
    shift (in row-major order of ``(dy, dx)``) that reaches it."""
    ha, wa = max(r for r, _ in a) + 1, max(c for _, c in a) + 1
    hb, wb = max(r for r, _ in b) + 1, max(c for _, c in b) + 1
    best, best_shift = len(a) + len(b), (0, 0)
    for dy in range(-(hb - 1), ha):
        for dx in range(-(wb - 1), wa):
            if max_shift is not None and (abs(dy) > max_shift or abs(dx) > max_shift):
                continue
            d = len(a.symmetric_difference({(r + dy, c + dx) for r, c in b}))
            if d < best:
                best, best_shift = d, (dy, dx)
    return best, best_shift


def mask_distance(a: frozenset[Cell], b: frozenset[Cell], max_shift: int | None = None) -> int:
    """Hamming distance between two cell sets (each anchored at (0, 0)) under the best integer
    shift of ``b`` that keeps it overlapping ``a``; ``max_shift`` bounds the shift per axis."""
    return _best_alignment(a, b, max_shift)[0]


def match_template(cells: Iterable[Cell], tolerance: int = 1) -> tuple[str, Cell | None]:
    """The shape whose template is within ``tolerance`` cells of the blob and the top-left cell of
    that template at its best alignment (in the blob's coordinates), else ``("unknown", None)``.

    Only templates whose bounding box and cell count are within ``tolerance`` of the blob's are
    compared (anything further cannot be within ``tolerance``), which keeps noisy grids with many
    small blobs cheap to parse. At ``tolerance`` < 4 the alignment is unique: every template
    differs from itself shifted by one cell in at least 8 cells.
    """
    cells = list(cells)
    blob, h, w = normalize_cells(cells)
    r0, c0 = min(r for r, _ in cells), min(c for _, c in cells)
    best, best_d, best_corner = UNKNOWN, tolerance + 1, None
    for name, tmpl in TEMPLATES.items():
        th, tw = TEMPLATE_SIZES[name]
        if abs(th - h) > tolerance or abs(tw - w) > tolerance or abs(len(tmpl) - len(blob)) > tolerance:
            continue
        d, (dy, dx) = _best_alignment(blob, tmpl, max_shift=tolerance)
        if d < best_d:
            best, best_d, best_corner = name, d, (r0 + dy, c0 + dx)
    return best, best_corner


def classify_cells(cells: Iterable[Cell], tolerance: int = 1) -> str:
    """The shape whose template is within ``tolerance`` cells of the blob, else ``"unknown"``
    (see ``match_template``)."""
    return match_template(cells, tolerance)[0]
