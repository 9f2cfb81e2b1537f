"""The programmatic ShapeWorld scorer, the analogue of GenEval's detector-based evaluation.

``parse_grid`` finds the components of a grid (8-connected components of one colour, each classified
by its cell pattern); ``score_t2i`` checks the recognised objects against a prompt's metadata with
GenEval's rules:

- include entry ``{"class", "count", "color"?, "position"?}``: at least ``count`` objects of the
  class (presence/count); at least ``count`` of them in ``color``; at least ``count`` of those in
  relation ``position[0]`` to an object of entry ``position[1]`` (GenEval's bounding-box-centre rule);
- exclude entry: fewer than ``count`` objects of the class (of ``color`` if given).

Each check contributes ``count`` units for an include entry (how many of the required objects
exist, capped at ``count``) and one unit for an exclude entry. The strict score is 1 only if every
unit is met (GenEval's score); the partial score is the fraction met, a dense reward.

Where GenEval trusts its detector's ranking (it checks the ``count`` most confident boxes), this
scorer asks whether *some* ``count`` objects qualify, which is deterministic and order-free.

**Unrecognised marks fail.** A component within ``tolerance`` (1) cells of a template is that shape,
at that template's box (so a shape with one stray cell attached, or one cell missing, is still that
shape and does not move); anything else is ``"unknown"``, a separate one-cell speck included.
GenEval's detector ignores blobs below its confidence threshold. Here an RL policy is optimised
against the scorer and would learn to exploit that: asked for "two triangles", it could draw three and
corrupt one into an unknown blob to pass "fewer than three". So where a grid holds any unknown
component:

- a ``clean`` check, "no unrecognised blobs", joins the checks with 0 of 1 units: the strict score is
  0 and the partial score has one more unit to miss;
- exclude checks are not met: an unrecognised blob may be the excluded object, so "fewer than n"
  cannot be certified (without this, hiding the extra triangle would trade a failed exclude unit for
  the clean unit and still pay where the grid already held a blob).

A grid without unknown components gets no clean unit, so it scores by GenEval's rules alone (a unit
that clean grids met would pay a blank canvas). The unit is one per grid, not one per blob: a stray
cell that bridges two blobs would otherwise remove a unit and raise the score.

*Stray cells never pay* (at ``tolerance`` 1): let ``G'`` be ``G`` with some background cells painted,
in any colours, such that every object ``G'`` recognises is one ``G`` recognises (same shape, colour
and box), i.e. the new cells complete no shape. Then for every prompt, strict(``G'``) ≤ strict(``G``)
and partial(``G'``) ≤ partial(``G``). Each object of ``G`` survives in ``G'`` or is absorbed into an
unknown component, and unknown components stay unknown. If ``G'`` has none, nothing was absorbed and
it scores as ``G``; otherwise it scores its include units only, over the prompt's units plus one, and
include units can only drop as objects disappear.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

from .palette import BACKGROUND, GRID, TOKEN_TO_COLOR, as_grid
from .prompts import check_metadata
from .scenes import DetectedObject, bbox_of, relative_position
from .shapes import TEMPLATE_SIZES, UNKNOWN, Cell, match_template

_NEIGHBOURS = [(dr, dc) for dr in (-1, 0, 1) for dc in (-1, 0, 1) if (dr, dc) != (0, 0)]


def parse_grid(grid: object, tolerance: int = 1) -> list[DetectedObject]:
    """The components of a grid, in raster order of their first cell.

    Components are 8-connected (diagonal contact merges blobs, so two touching squares read as one
    unknown blob, never as two squares); a component within ``tolerance`` cells of a shape's
    template takes that shape and the box of that template at its best alignment (which may reach
    past the grid's edge when a cell there is missing); anything else is ``"unknown"``, boxed by its
    cells.
    """
    rows = as_grid(grid).tolist()
    seen = [[False] * GRID for _ in range(GRID)]
    objects: list[DetectedObject] = []
    for r0 in range(GRID):
        for c0 in range(GRID):
            token = rows[r0][c0]
            if token == BACKGROUND or seen[r0][c0]:
                continue
            seen[r0][c0] = True
            stack = [(r0, c0)]
            cells: set[Cell] = set()
            while stack:
                r, c = stack.pop()
                cells.add((r, c))
                for dr, dc in _NEIGHBOURS:
                    rr, cc = r + dr, c + dc
                    if 0 <= rr < GRID and 0 <= cc < GRID and not seen[rr][cc] and rows[rr][cc] == token:
                        seen[rr][cc] = True
                        stack.append((rr, cc))
            frozen = frozenset(cells)
            shape, corner = match_template(frozen, tolerance)
            if corner is None:
                box = bbox_of(frozen)
            else:
                h, w = TEMPLATE_SIZES[shape]
                box = (corner[0], corner[1], corner[0] + h - 1, corner[1] + w - 1)
            objects.append(DetectedObject(shape, TOKEN_TO_COLOR[token], box, frozen))
    return objects


@dataclass
class Check:
    """One constraint of a prompt: ``met`` of ``total`` units hold."""

    kind: str  # "count", "color", "position", "exclude" or "clean"
    text: str
    met: int
    total: int

    @property
    def ok(self) -> bool:
        return self.met == self.total


@dataclass
class ScoreDetails:
    """What ``score_t2i`` saw and checked: the recognised ``objects``, the ``unknown`` components."""

    objects: list[DetectedObject]
    checks: list[Check] = field(default_factory=list)
    unknown: list[DetectedObject] = field(default_factory=list)

    @property
    def failures(self) -> list[str]:
        return [f"{c.text}: {c.met}/{c.total}" for c in self.checks if not c.ok]


def _matching(objects: Sequence[DetectedObject], req: dict) -> list[DetectedObject]:
    color = req.get("color")
    return [o for o in objects if o.shape == req["class"] and (color is None or o.color == color)]


def score_t2i(grid: object, metadata: dict | str, tolerance: int = 1) -> tuple[float, float, ScoreDetails]:
    """``(strict, partial, details)`` of a grid against a prompt's metadata (see the module docstring)."""
    m = check_metadata(metadata)
    parsed = parse_grid(grid, tolerance)
    objects = [o for o in parsed if o.shape != UNKNOWN]
    unknown = [o for o in parsed if o.shape == UNKNOWN]
    details = ScoreDetails(objects, unknown=unknown)
    checks = details.checks
    # Objects that satisfy each include entry so far; a position check looks at its target's.
    matched: list[list[DetectedObject]] = []
    for req in m["include"]:
        n, cls = req["count"], req["class"]
        of_class = [o for o in objects if o.shape == cls]
        checks.append(Check("count", f"at least {n} {cls}", min(len(of_class), n), n))
        candidates = of_class
        if req.get("color") is not None:
            candidates = _matching(objects, req)
            checks.append(Check("color", f"at least {n} {req['color']} {cls}", min(len(candidates), n), n))
        if "position" in req:
            rel, j = req["position"]
            targets = matched[j]
            # Existential like GenEval's with one target: count candidates in the relation to a
            # single shared target object, taking the best target.
            best = max(
                (sum(rel in relative_position(o.bbox, t.bbox) for o in candidates) for t in targets),
                default=0,
            )
            checks.append(Check("position", f"{cls} {rel} entry {j}", min(best, n), n))
        matched.append(candidates)
    for req in m.get("exclude", []):
        found = _matching(objects, req)
        what = f"{req['color']} {req['class']}" if req.get("color") else req["class"]
        # An unknown blob may be one more of the excluded objects: "fewer than" is then unproven.
        holds = len(found) < req["count"] and not unknown
        checks.append(Check("exclude", f"fewer than {req['count']} {what}", int(holds), 1))
    if unknown:
        checks.append(Check("clean", "no unrecognised blobs", 0, 1))
    met = sum(c.met for c in checks)
    total = sum(c.total for c in checks)
    strict = float(all(c.ok for c in checks))
    return strict, met / total, details


def summarize_by_tag(tags: Sequence[str], scores: Sequence[float]) -> dict[str, float]:
    """Mean score per tag plus ``"overall"``, the mean over tags (GenEval's overall score)."""
    if len(tags) != len(scores):
        raise ValueError(f"got {len(tags)} tags for {len(scores)} scores")
    if not tags:
        raise ValueError("summarize_by_tag needs at least one score")
    sums: Counter[str] = Counter()
    counts: Counter[str] = Counter()
    for tag, s in zip(tags, scores):
        sums[tag] += float(s)
        counts[tag] += 1
    out = {tag: sums[tag] / counts[tag] for tag in sorted(counts)}
    out["overall"] = sum(out.values()) / len(out)
    return out
