"""ShapeWorld scenes: what a scene asks for (``SceneSpec``), the objects in a grid
(``DetectedObject``), GenEval's relative-position rule, and rendering a spec into a grid.

Coordinates: a cell is ``(row, col)`` with row 0 at the top; a bounding box is
``(top, left, bottom, right)`` with inclusive cell indices.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from .palette import BACKGROUND, COLORS, GRID, color_token
from .shapes import TEMPLATE_SIZES, TEMPLATES, Cell, check_shape

RELATIONS: tuple[str, ...] = ("left of", "right of", "above", "below")
# GenEval's POSITION_THRESHOLD: centre offsets within this fraction of the summed box sizes
# count as no offset, so barely-shifted objects are in no relation.
POSITION_MARGIN = 0.1
MAX_OBJECTS = 4

BBox = tuple[int, int, int, int]


def check_relation(rel: str) -> str:
    if rel not in RELATIONS:
        raise ValueError(f"unknown relation {rel!r}; expected one of {list(RELATIONS)}")
    return rel


@dataclass(frozen=True)
class ObjectSpec:
    """One object a scene must hold. ``color=None`` lets the renderer pick one; ``relation`` is
    ``(relation, j)``: this object must be ``relation`` object ``j`` (an earlier object)."""

    shape: str
    color: str | None = None
    relation: tuple[str, int] | None = None


@dataclass(frozen=True)
class SceneSpec:
    """The objects of a scene, placed in order (so relations point backwards)."""

    objects: tuple[ObjectSpec, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "objects", tuple(self.objects))
        if not 1 <= len(self.objects) <= MAX_OBJECTS:
            raise ValueError(f"a scene holds 1 to {MAX_OBJECTS} objects, got {len(self.objects)}")
        for i, obj in enumerate(self.objects):
            check_shape(obj.shape)
            if obj.color is not None:
                color_token(obj.color)
            if obj.relation is not None:
                rel, j = obj.relation
                check_relation(rel)
                if not (isinstance(j, int) and 0 <= j < i):
                    raise ValueError(f"object {i}'s relation must point to an earlier object, got index {j!r}")


@dataclass(frozen=True)
class DetectedObject:
    """An object in a grid, as placed by the renderer or as found by ``parse_grid``."""

    shape: str
    color: str
    bbox: BBox
    cells: frozenset[Cell]

    @property
    def center(self) -> tuple[float, float]:
        """``(x, y)`` centre of the bounding box in cell units (x to the right, y down)."""
        top, left, bottom, right = self.bbox
        return (left + right + 1) / 2, (top + bottom + 1) / 2


def bbox_of(cells: frozenset[Cell] | set[Cell]) -> BBox:
    rows = [r for r, _ in cells]
    cols = [c for _, c in cells]
    return min(rows), min(cols), max(rows), max(cols)


def relative_position(a: BBox, b: BBox, margin: float = POSITION_MARGIN) -> set[str]:
    """The relations of box ``a`` to box ``b`` by GenEval's rule: the offset of the box centres,
    each axis shrunk towards 0 by ``margin`` times the summed box sizes, then normalised by the
    raw offset's length; a component beyond ±0.5 gives a relation (so a diagonal offset can give two)."""
    from ..rewards.geneval_rules import relative_position as geneval_relative_position

    # Cells (top, left, bottom, right), inclusive → GenEval's (x0, y0, x1, y1) boxes.
    (at, al, ab, ar), (bt, bl, bb, br) = a, b
    return geneval_relative_position((al, at, ar + 1, ab + 1), (bl, bt, br + 1, bb + 1), margin=margin)


def as_rng(rng: random.Random | int | None) -> random.Random:
    """A ``random.Random`` from a generator, a seed, or ``None`` (fresh, unseeded)."""
    if isinstance(rng, random.Random):
        return rng
    if rng is None or isinstance(rng, int):
        return random.Random(rng)
    raise ValueError(f"rng must be a random.Random, an int seed or None, got {type(rng).__name__}")


def _boxes_clear(box: BBox, others: list[BBox]) -> bool:
    # Boxes stay one cell apart (diagonals included), so no two objects ever touch and each
    # parses back as its own connected component even when two share a colour.
    top, left, bottom, right = box
    return all(
        bottom + 1 < o_top or o_bottom + 1 < top or right + 1 < o_left or o_right + 1 < left
        for o_top, o_left, o_bottom, o_right in others
    )


def place_scene(
    spec: SceneSpec, rng: random.Random | int | None = None, max_tries: int = 200
) -> tuple[torch.Tensor, list[DetectedObject]]:
    """Render ``spec`` at uniformly random valid positions: the ``(GRID, GRID)`` long grid and the
    placed objects (in spec order). ``RuntimeError`` if no placement is found in ``max_tries``."""
    rng = as_rng(rng)
    for _ in range(max_tries):
        placed: list[DetectedObject] = []
        for obj in spec.objects:
            h, w = TEMPLATE_SIZES[obj.shape]
            boxes = [p.bbox for p in placed]
            candidates = [
                (r, c, r + h - 1, c + w - 1)
                for r in range(GRID - h + 1)
                for c in range(GRID - w + 1)
                if _boxes_clear((r, c, r + h - 1, c + w - 1), boxes)
            ]
            if obj.relation is not None:
                rel, j = obj.relation
                candidates = [box for box in candidates if rel in relative_position(box, placed[j].bbox)]
            if not candidates:
                break
            top, left, bottom, right = rng.choice(candidates)
            color = obj.color if obj.color is not None else rng.choice(COLORS)
            cells = frozenset((top + r, left + c) for r, c in TEMPLATES[obj.shape])
            placed.append(DetectedObject(obj.shape, color, (top, left, bottom, right), cells))
        else:
            grid = torch.full((GRID, GRID), BACKGROUND, dtype=torch.long)
            for p in placed:
                rows, cols = zip(*p.cells)
                grid[list(rows), list(cols)] = color_token(p.color)
            return grid, placed
    raise RuntimeError(f"could not place {spec} in {max_tries} tries")


def render_scene(spec: SceneSpec, rng: random.Random | int | None = None) -> torch.Tensor:
    """A ``(GRID, GRID)`` long grid showing ``spec`` at random positions that satisfy it."""
    return place_scene(spec, rng)[0]
