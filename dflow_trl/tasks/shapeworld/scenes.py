"""ShapeWorld scenes: what a scene asks for (``SceneSpec``), the objects in a grid
(``DetectedObject``), GenEval's relative-position rule, and rendering a spec into a grid.

Coordinates: a cell is ``(row, col)`` with row 0 at the top; a bounding box is
``(top, left, bottom, right)`` with inclusive cell indices.
"""

from __future__ import annotations

import itertools
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
                    raise ValueError(
                        f"object {i}'s relation must point to an earlier object, got index {j!r}"
                    )


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
    from ...rewards.geneval_rules import relative_position as geneval_relative_position

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


# Objects sit in a SLOTS × SLOTS lattice of SLOT-cell squares, each centred in its slot. A tiny
# CPU-trained model can then learn exact silhouettes: what varies between scenes is *which* slots
# hold *what*, the part GenEval scores, not sub-object jitter. Every template is at most SLOT − 1
# cells wide and tall, so neighbouring objects keep a one-cell gap and parse back as separate
# components even when they share a colour.
SLOTS = 2
SLOT = GRID // SLOTS
# The colour a canonical scene gives an object whose colour the prompt leaves open. None of these
# (colour, shape) bindings is held out of training.
DEFAULT_COLORS: dict[str, str] = {
    "square": "blue", "circle": "red", "triangle": "green", "cross": "yellow", "diamond": "purple",
}  # fmt: skip


def slot_box(slot: int, shape: str) -> BBox:
    """The bounding box of ``shape`` centred in ``slot`` (numbered row-major from the top left)."""
    if not 0 <= slot < SLOTS * SLOTS:
        raise ValueError(f"slot must lie in [0, {SLOTS * SLOTS}), got {slot}")
    h, w = TEMPLATE_SIZES[check_shape(shape)]
    top = (slot // SLOTS) * SLOT + (SLOT - h) // 2
    left = (slot % SLOTS) * SLOT + (SLOT - w) // 2
    return top, left, top + h - 1, left + w - 1


def place_scene(
    spec: SceneSpec, rng: random.Random | int | None = None, canonical: bool = False
) -> tuple[torch.Tensor, list[DetectedObject]]:
    """Render ``spec`` with its objects in uniformly random free slots that satisfy its relations:
    the ``(GRID, GRID)`` long grid and the placed objects (in spec order). ``RuntimeError`` if the
    relations admit no placement.

    ``canonical`` makes the scene a function of ``spec``: the first valid slot assignment in
    row-major order (object 0 top left, …) and ``DEFAULT_COLORS`` for open colours. Text-to-image
    pretraining uses it: a factorised sampler then never has to break the symmetry between equally
    likely layouts or colours cell by cell, which a model this small cannot learn to do."""
    rng = as_rng(rng)
    orders = list(itertools.permutations(range(SLOTS * SLOTS), len(spec.objects)))
    if not canonical:
        rng.shuffle(orders)
    for order in orders:
        placed: list[DetectedObject] = []
        for obj, slot in zip(spec.objects, order):
            box = slot_box(slot, obj.shape)
            if obj.relation is not None and obj.relation[0] not in relative_position(
                box, placed[obj.relation[1]].bbox
            ):
                break
            color = obj.color or (DEFAULT_COLORS[obj.shape] if canonical else rng.choice(COLORS))
            cells = frozenset((box[0] + r, box[1] + c) for r, c in TEMPLATES[obj.shape])
            placed.append(DetectedObject(obj.shape, color, box, cells))
        else:
            grid = torch.full((GRID, GRID), BACKGROUND, dtype=torch.long)
            for p in placed:
                rows, cols = zip(*p.cells)
                grid[list(rows), list(cols)] = color_token(p.color)
            return grid, placed
    raise RuntimeError(f"no slot assignment satisfies {spec}")


def render_scene(
    spec: SceneSpec, rng: random.Random | int | None = None, canonical: bool = False
) -> torch.Tensor:
    """A ``(GRID, GRID)`` long grid showing ``spec`` in random (or canonical) slots that satisfy it."""
    return place_scene(spec, rng, canonical)[0]
