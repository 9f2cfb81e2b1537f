"""ShapeWorld scorer and rewards: render→parse→score round trips and hand-drawn near misses."""

from __future__ import annotations

import json
import random

import pytest
import torch

from dflow_trl.tasks.shapeworld import (
    GRID,
    TAGS,
    all_prompts,
    color_token,
    parse_grid,
    place_scene,
    relative_position,
    render_scene,
    score_t2i,
    spec_from_metadata,
    summarize_by_tag,
)
from dflow_trl.tasks.shapeworld.rewards import shapeworld_answer, shapeworld_partial, shapeworld_strict
from dflow_trl.tasks.shapeworld.scenes import bbox_of
from dflow_trl.tasks.shapeworld.shapes import TEMPLATE_SIZES, TEMPLATES

# Hand-drawn grids: one letter per cell, "." for background.
LETTERS = {
    "r": "red",
    "o": "orange",
    "y": "yellow",
    "g": "green",
    "c": "cyan",
    "b": "blue",
    "p": "purple",
    "k": "pink",
}


def draw(*rows: str) -> torch.Tensor:
    """A grid from up to 16 rows of up to 16 letters (missing cells are background)."""
    grid = torch.zeros(GRID, GRID, dtype=torch.long)
    for r, line in enumerate(rows):
        for c, ch in enumerate(line):
            if ch != ".":
                grid[r, c] = color_token(LETTERS[ch])
    return grid


def stamp(grid: torch.Tensor, shape: str, color: str, top: int, left: int) -> torch.Tensor:
    for r, c in TEMPLATES[shape]:
        grid[top + r, left + c] = color_token(color)
    return grid


def blank() -> torch.Tensor:
    return torch.zeros(GRID, GRID, dtype=torch.long)


def prompt(text: str) -> dict:
    (m,) = [m for m in all_prompts() if m["prompt"] == text]
    return m


def scores(grid: torch.Tensor, text: str) -> tuple[float, float]:
    strict, partial, _ = score_t2i(grid, prompt(text))
    return strict, partial


# ---- parsing -------------------------------------------------------------------------------------


def test_parse_hand_drawn_scene():
    grid = draw(
        "rrrr............",
        "rrrr.....b......",
        "rrrr....bbb.....",
        "rrrr...bbbbb....",
        "........bbb.....",
        ".........b......",
        "...y............",
        "..yyy.......g...",
        ".yyyyy......g...",
        "yyyyyyy...ggggg.",
        "............g...",
        "..ppp.......g...",
        ".ppppp..........",
        ".ppppp..........",
        ".ppppp.........k",
        "..pp............",
    )
    found = {(o.shape, o.color, o.bbox) for o in parse_grid(grid)}
    assert found == {
        ("square", "red", (0, 0, 3, 3)),
        ("diamond", "blue", (1, 7, 5, 11)),
        ("triangle", "yellow", (6, 0, 9, 6)),
        ("cross", "green", (7, 10, 11, 14)),
        ("circle", "purple", (11, 1, 15, 5)),  # one cell short: within tolerance
        ("unknown", "pink", (14, 15, 14, 15)),  # a stray cell
    }


def test_parse_flat_and_nested_inputs_agree():
    grid = stamp(blank(), "circle", "cyan", 3, 4)
    a = parse_grid(grid)
    assert parse_grid(grid.flatten().tolist()) == a
    assert parse_grid(grid.tolist()) == a
    assert [(o.shape, o.color) for o in a] == [("circle", "cyan")]


def test_touching_blobs_of_one_colour_merge_and_of_two_colours_do_not():
    same = stamp(stamp(blank(), "square", "red", 2, 2), "square", "red", 2, 6)  # side by side, no gap
    assert [o.shape for o in parse_grid(same)] == ["unknown"]
    diagonal = stamp(stamp(blank(), "square", "red", 2, 2), "square", "red", 6, 6)  # corner contact
    assert [o.shape for o in parse_grid(diagonal)] == ["unknown"]
    two_colours = stamp(stamp(blank(), "square", "red", 2, 2), "square", "blue", 2, 6)
    assert sorted((o.shape, o.color) for o in parse_grid(two_colours)) == [
        ("square", "blue"),
        ("square", "red"),
    ]


@pytest.mark.parametrize("shape", list(TEMPLATES))
def test_one_cell_off_is_tolerated_two_are_not(shape):
    grid = stamp(blank(), shape, "orange", 5, 5)
    cells = sorted(TEMPLATES[shape])
    one_off = grid.clone()
    one_off[5 + cells[-1][0], 5 + cells[-1][1]] = 0
    assert [o.shape for o in parse_grid(one_off)] == [shape]
    assert [o.shape for o in parse_grid(one_off, tolerance=0)] == ["unknown"]
    two_off = one_off.clone()
    two_off[5 + cells[0][0], 5 + cells[0][1]] = 0
    assert parse_grid(two_off)[0].shape != shape


def test_bad_grids_raise():
    with pytest.raises(ValueError, match="shape"):
        parse_grid(torch.zeros(8, 8, dtype=torch.long))
    with pytest.raises(ValueError, match="shape"):
        parse_grid([0] * 255)
    with pytest.raises(ValueError, match="integer"):
        parse_grid(torch.zeros(GRID, GRID))
    with pytest.raises(ValueError, match="tokens must lie"):
        parse_grid(torch.full((GRID, GRID), 99))


# ---- round trip -------------------------------------------------------------------------------


def test_every_prompt_renders_to_a_perfect_score():
    """Every prompt of all six categories (1280), rendered at random places, scores 1 strictly."""
    rng = random.Random(0)
    seen = set()
    for m in all_prompts():
        grid = render_scene(spec_from_metadata(json.dumps(m), rng), rng)
        strict, partial, details = score_t2i(grid, m)
        assert (strict, partial) == (1.0, 1.0), (m["prompt"], details.failures)
        seen.add(m["tag"])
    assert seen == set(TAGS)


def test_rendered_objects_parse_back_exactly():
    rng = random.Random(1)
    for m in rng.sample(all_prompts(), 200):
        grid, placed = place_scene(spec_from_metadata(m, rng), rng)
        assert sorted(parse_grid(grid), key=lambda o: o.bbox) == sorted(placed, key=lambda o: o.bbox)


# ---- near misses, one category at a time -------------------------------------------------------


def test_single_object():
    assert scores(stamp(blank(), "triangle", "pink", 3, 3), "a photo of a triangle") == (1.0, 1.0)
    assert scores(stamp(blank(), "diamond", "pink", 3, 3), "a photo of a triangle") == (0.0, 0.0)
    assert scores(blank(), "a photo of a triangle") == (0.0, 0.0)


def test_two_object():
    both = stamp(stamp(blank(), "circle", "red", 1, 1), "cross", "blue", 9, 9)
    assert scores(both, "a photo of a circle and a cross") == (1.0, 1.0)
    missing = stamp(blank(), "circle", "red", 1, 1)
    assert scores(missing, "a photo of a circle and a cross") == (0.0, 0.5)
    wrong_shape = stamp(stamp(blank(), "circle", "red", 1, 1), "diamond", "blue", 9, 9)
    assert scores(wrong_shape, "a photo of a circle and a cross") == (0.0, 0.5)


def test_counting():
    three = blank()
    for top, left in ((0, 0), (0, 8), (8, 0)):
        stamp(three, "square", "green", top, left)
    assert scores(three, "a photo of three squares") == (1.0, 1.0)
    # Three of four required squares, and "fewer than five" holds: 4 of 5 units.
    assert scores(three, "a photo of four squares") == (0.0, 0.8)
    # An extra square breaks "fewer than three": the count is exact, as GenEval's.
    assert scores(three, "a photo of two squares") == (0.0, 2 / 3)
    # Other shapes do not count, and same-coloured squares that touch are one unknown blob (here
    # the new square joins the two on the left), leaving 1 of 3 squares. The blob may hide more
    # squares, so "fewer than four" is not met, and it fails the clean unit: 1 of 5 units.
    mixed = stamp(stamp(three.clone(), "circle", "green", 9, 9), "square", "green", 4, 0)
    assert [o.shape for o in parse_grid(mixed)].count("square") == 1
    assert scores(mixed, "a photo of three squares") == (0.0, 1 / 5)


def test_colors():
    assert scores(stamp(blank(), "circle", "blue", 4, 4), "a photo of a blue circle") == (1.0, 1.0)
    assert scores(stamp(blank(), "circle", "purple", 4, 4), "a photo of a blue circle") == (0.0, 0.5)
    assert scores(stamp(blank(), "square", "blue", 4, 4), "a photo of a blue circle") == (0.0, 0.0)
    # A blue circle anywhere satisfies it, even beside a circle of another colour.
    two = stamp(stamp(blank(), "circle", "purple", 0, 0), "circle", "blue", 8, 8)
    assert scores(two, "a photo of a blue circle") == (1.0, 1.0)


def test_position():
    left_right = stamp(stamp(blank(), "square", "red", 6, 1), "circle", "cyan", 6, 10)
    assert scores(left_right, "a photo of a square left of a circle") == (1.0, 1.0)
    assert scores(left_right, "a photo of a circle right of a square") == (1.0, 1.0)
    assert scores(left_right, "a photo of a square right of a circle") == (0.0, 2 / 3)
    assert scores(left_right, "a photo of a square above a circle") == (0.0, 2 / 3)
    # Stacked with a small sideways shift: within GenEval's margin, so "above" but not "left of".
    stacked = stamp(stamp(blank(), "square", "red", 1, 5), "circle", "cyan", 9, 6)
    assert relative_position(parse_grid(stacked)[0].bbox, parse_grid(stacked)[1].bbox) == {"above"}
    assert scores(stacked, "a photo of a square above a circle") == (1.0, 1.0)
    assert scores(stacked, "a photo of a square left of a circle") == (0.0, 2 / 3)
    # No reference object: presence of the square only.
    alone = stamp(blank(), "square", "red", 6, 1)
    assert scores(alone, "a photo of a square left of a circle") == (0.0, 1 / 3)


def test_color_attr():
    good = stamp(stamp(blank(), "square", "red", 1, 1), "triangle", "blue", 10, 6)
    assert scores(good, "a photo of a red square and a blue triangle") == (1.0, 1.0)
    swapped = stamp(stamp(blank(), "square", "blue", 1, 1), "triangle", "red", 10, 6)
    assert scores(swapped, "a photo of a red square and a blue triangle") == (0.0, 0.5)
    one_wrong = stamp(stamp(blank(), "square", "red", 1, 1), "triangle", "green", 10, 6)
    assert scores(one_wrong, "a photo of a red square and a blue triangle") == (0.0, 0.75)


def test_details_and_metadata_errors():
    _, _, details = score_t2i(stamp(blank(), "circle", "purple", 4, 4), prompt("a photo of a blue circle"))
    assert [(c.kind, c.met, c.total) for c in details.checks] == [("count", 1, 1), ("color", 0, 1)]
    assert details.failures == ["at least 1 blue circle: 0/1"]
    grid = blank()
    with pytest.raises(ValueError, match="unknown tag"):
        score_t2i(grid, {"tag": "style", "include": [{"class": "square", "count": 1}]})
    with pytest.raises(ValueError, match="unknown shape"):
        score_t2i(grid, {"tag": "single_object", "include": [{"class": "dog", "count": 1}]})
    with pytest.raises(ValueError, match="unknown colour"):
        score_t2i(grid, {"tag": "colors", "include": [{"class": "square", "count": 1, "color": "teal"}]})
    with pytest.raises(ValueError, match="earlier entry"):
        score_t2i(
            grid, {"tag": "position", "include": [{"class": "square", "count": 1, "position": ["above", 0]}]}
        )
    with pytest.raises(ValueError, match="JSON"):
        score_t2i(grid, "{not json")


def test_summarize_by_tag():
    out = summarize_by_tag(["colors", "colors", "position"], [1.0, 0.0, 1.0])
    assert out == {"colors": 0.5, "position": 1.0, "overall": 0.75}
    with pytest.raises(ValueError):
        summarize_by_tag(["colors"], [])


# ---- unrecognised marks fail ----------------------------------------------------------------------


@pytest.mark.parametrize("shape", list(TEMPLATES))
def test_two_cells_missing_or_extra_is_unknown_and_fails(shape):
    """A template with two cells missing or two extra is no shape: strict 0, nothing met."""
    text = f"a photo of {'an' if shape[0] in 'aeiou' else 'a'} {shape}"
    cells = sorted(TEMPLATES[shape])
    h, w = TEMPLATE_SIZES[shape]
    exact = stamp(blank(), shape, "cyan", 5, 5)
    assert scores(exact, text) == (1.0, 1.0)
    missing = exact.clone()
    for r, c in (cells[0], cells[-1]):
        missing[5 + r, 5 + c] = 0
    extra = exact.clone()
    extra[4, 5 + cells[0][1]] = extra[5 + h, 5 + cells[-1][1]] = color_token(
        "cyan"
    )  # above the top, below the bottom
    for grid in (missing, extra):
        assert {o.shape for o in parse_grid(grid)} == {"unknown"}
        strict, partial, details = score_t2i(grid, prompt(text))
        assert (strict, partial) == (0.0, 0.0)
        assert details.failures == [f"at least 1 {shape}: 0/1", "no unrecognised blobs: 0/1"]
    assert w <= 7  # the extra cells stay inside the grid


def test_a_corrupted_extra_object_does_not_hide():
    """The hack: "two triangles" drawn as three, the third corrupted into an unknown blob."""
    two = stamp(stamp(blank(), "triangle", "green", 0, 0), "triangle", "green", 0, 8)
    three = stamp(two.clone(), "triangle", "green", 8, 0)
    corrupted = three.clone()
    corrupted[8, 2] = corrupted[8, 4] = color_token("green")  # two cells beside the apex at (8, 3)
    assert [o.shape for o in parse_grid(corrupted)] == ["triangle", "triangle", "unknown"]
    clean = scores(two, "a photo of two triangles")
    overcount = scores(three, "a photo of two triangles")
    strict, partial, details = score_t2i(corrupted, prompt("a photo of two triangles"))
    assert clean == (1.0, 1.0) and overcount == (0.0, 2 / 3)
    # Both triangles counted; "fewer than three" unproven beside the blob; the clean unit missed.
    assert (strict, partial) == (0.0, 2 / 4)
    assert partial < overcount[1] < clean[1]  # hiding the extra one pays less than drawing it
    assert details.failures == ["fewer than 3 triangle: 0/1", "no unrecognised blobs: 0/1"]
    assert [o.bbox for o in details.unknown] == [(8, 0, 11, 6)]
    # A different colour does not help either: it is a third triangle, still one too many.
    recoloured = stamp(two.clone(), "triangle", "red", 8, 0)
    assert scores(recoloured, "a photo of two triangles") == overcount


def test_absorbing_an_object_into_an_existing_blob_does_not_pay():
    """With a blob already on the canvas, a bridge that merges the extra triangle into it drops a
    triangle but scores no better: exclude units are unmet beside any blob, not only a new one."""
    three = stamp(
        stamp(stamp(blank(), "triangle", "green", 0, 0), "triangle", "green", 0, 8), "triangle", "green", 9, 0
    )
    three[13, 8] = color_token("green")  # a speck one cell right of the third triangle's base
    before = score_t2i(three, prompt("a photo of two triangles"))
    bridged = three.clone()
    bridged[12, 7] = color_token("green")  # touches the base's right end (12, 6) and the speck
    after = score_t2i(bridged, prompt("a photo of two triangles"))
    assert [o.shape for o in before[2].objects] == ["triangle"] * 3 and len(before[2].unknown) == 1
    assert [o.shape for o in after[2].objects] == ["triangle"] * 2 and len(after[2].unknown) == 1
    assert before[:2] == after[:2] == (0.0, 2 / 4)


def test_a_separate_speck_fails_an_attached_cell_does_not():
    square = stamp(blank(), "square", "blue", 4, 4)  # rows and columns 4-7
    assert scores(square, "a photo of a square") == (1.0, 1.0)
    # A one-cell speck one column away (not touching), in the square's colour or another: unknown.
    for color in ("blue", "pink"):
        speck = square.clone()
        speck[4, 9] = color_token(color)
        strict, partial, details = score_t2i(speck, prompt("a photo of a square"))
        assert (strict, partial) == (0.0, 0.5)
        assert [(o.color, o.bbox) for o in details.unknown] == [(color, (4, 9, 4, 9))]
        assert details.failures == ["no unrecognised blobs: 0/1"]
    # A cell of another colour touching the square is its own component, so it fails too.
    touching = square.clone()
    touching[8, 8] = color_token("pink")
    assert scores(touching, "a photo of a square") == (0.0, 0.5)
    # The same cell in the square's colour joins it: one cell off the template, still the square,
    # at the template's box (the stray cell does not move it).
    attached = square.clone()
    attached[8, 8] = color_token("blue")
    (obj,) = parse_grid(attached)
    assert (obj.shape, obj.bbox, len(obj.cells)) == ("square", (4, 4, 7, 7), 17)
    assert scores(attached, "a photo of a square") == (1.0, 1.0)
    # A second attached cell is two off: an unknown blob, no square.
    attached[3, 3] = color_token("blue")
    assert [o.shape for o in parse_grid(attached)] == ["unknown"]
    assert scores(attached, "a photo of a square") == (0.0, 0.0)


def test_an_attached_or_missing_cell_does_not_move_a_box():
    """A tolerated cell leaves the object at its template's box, so a stray cell cannot push a
    relation past GenEval's margin. Here the square is above the circle but, by the margin, not left
    of it; one cell attached on its left would make its own cells' box left of the circle."""
    grid = stamp(stamp(blank(), "square", "red", 0, 2), "circle", "cyan", 7, 7)
    assert scores(grid, "a photo of a square above a circle") == (1.0, 1.0)
    assert scores(grid, "a photo of a square left of a circle") == (0.0, 2 / 3)
    nudged = grid.clone()
    nudged[1, 1] = color_token("red")
    square, circle = parse_grid(nudged)
    assert (square.shape, square.bbox, bbox_of(square.cells)) == ("square", (0, 2, 3, 5), (0, 1, 3, 5))
    assert "left of" in relative_position(
        bbox_of(square.cells), circle.bbox
    )  # what the cells' box would give
    assert scores(nudged, "a photo of a square left of a circle") == (0.0, 2 / 3)
    assert scores(nudged, "a photo of a square above a circle") == (1.0, 1.0)
    # A missing extreme cell (the triangle's apex) does not shrink the box either.
    triangle = stamp(blank(), "triangle", "red", 6, 4)
    triangle[6, 7] = 0
    (obj,) = parse_grid(triangle)
    assert (obj.shape, obj.bbox, bbox_of(obj.cells)) == ("triangle", (6, 4, 9, 10), (7, 4, 9, 10))


def _recognised(details) -> set[tuple]:
    return {(o.shape, o.color, o.bbox) for o in details.objects}


def _paint_near(grid: torch.Tensor, rng: random.Random, near: list, colours: list[str]) -> None:
    """Paint one background cell: mostly within two cells of an object, often in its colour."""
    if near and rng.random() < 0.8:
        o = rng.choice(near)
        r = rng.randint(max(o.bbox[0] - 2, 0), min(o.bbox[2] + 2, GRID - 1))
        c = rng.randint(max(o.bbox[1] - 2, 0), min(o.bbox[3] + 2, GRID - 1))
        colour = o.color if rng.random() < 0.6 else rng.choice(colours)
    else:
        r, c, colour = rng.randrange(GRID), rng.randrange(GRID), rng.choice(colours)
    if int(grid[r, c]) == 0:
        grid[r, c] = color_token(colour)


def test_stray_cells_never_pay():
    """The module docstring's property on random scenes of every category: painting background cells
    (near objects, often in their colours, so they attach, bridge and corrupt) never raises strict
    or partial unless the new cells complete a shape. Scenes are canonical or random renders of the
    prompt (correct) or of another prompt of its category (so there is credit left to gain; for
    counting, the same shape at another count), a third with a speck on them already."""
    rng = random.Random(0)
    by_tag = {tag: all_prompts([tag]) for tag in TAGS}
    colours = list(LETTERS.values())
    stats = dict.fromkeys(
        ("trials", "completes_a_shape", "lower", "correct_with_blob", "attached", "absorbed"), 0
    )
    for trial in range(1200):
        m = rng.choice(by_tag[TAGS[trial % len(TAGS)]])
        others = by_tag[m["tag"]]
        if m["tag"] == "counting":
            others = [o for o in others if o["include"][0]["class"] == m["include"][0]["class"]]
        drawn = m if rng.random() < 0.5 else rng.choice(others)
        canonical = rng.random() < 0.5
        grid = render_scene(spec_from_metadata(drawn, rng, canonical=canonical), rng, canonical=canonical)
        if rng.random() < 1 / 3:
            _paint_near(grid, rng, parse_grid(grid), colours)
        strict, partial, details = score_t2i(grid, m)
        painted = grid.clone()
        for _ in range(rng.randint(1, 6)):
            _paint_near(painted, rng, details.objects, colours)
        strict2, partial2, details2 = score_t2i(painted, m)
        before, after = _recognised(details), _recognised(details2)
        if not after <= before:
            stats["completes_a_shape"] += 1  # outside the property (e.g. a cross grown into a diamond)
            continue
        stats["trials"] += 1
        assert strict2 <= strict and partial2 <= partial, (m["prompt"], details.failures, details2.failures)
        if details2.unknown:
            assert strict2 == 0.0 and details2.failures[-1] == "no unrecognised blobs: 0/1"
            if strict == 1.0:
                assert partial2 < 1.0
                stats["correct_with_blob"] += 1
        stats["lower"] += partial2 < partial
        stats["absorbed"] += len(after) < len(before)
        stats["attached"] += any(
            a.cells < b.cells and (a.shape, a.bbox) == (b.shape, b.bbox)
            for a in details.objects
            for b in details2.objects
        )
    # The property was exercised, not skipped: most trials qualify, many cost credit, objects get
    # absorbed into blobs, and cells attach within tolerance (the same object with more cells).
    assert stats["trials"] > 1100 and stats["completes_a_shape"] < 100, stats
    assert stats["lower"] > 500 and stats["correct_with_blob"] > 300, stats
    assert stats["absorbed"] > 60 and stats["attached"] > 30, stats


# ---- reward functions ---------------------------------------------------------------------------


def test_t2i_rewards_with_trl_signature():
    metas = [json.dumps(prompt("a photo of a blue circle")), json.dumps(prompt("a photo of a blue circle"))]
    good = stamp(blank(), "circle", "blue", 4, 4).flatten().tolist()
    near = stamp(blank(), "circle", "red", 4, 4).flatten()  # a tensor row works too
    kwargs = {
        "prompts": ["a photo of a blue circle"] * 2,
        "completions": [None, None],
        "completion_ids": [good, near],
    }
    assert shapeworld_strict(**kwargs, metadata=metas, trainer_state=None) == [1.0, 0.0]
    assert shapeworld_partial(**kwargs, metadata=metas) == [1.0, 0.5]
    with pytest.raises(ValueError, match="metadata"):
        shapeworld_strict(**kwargs)
    with pytest.raises(ValueError, match="2 completions but 1"):
        shapeworld_partial(**kwargs, metadata=metas[:1])
    with pytest.raises(ValueError, match="shape"):
        shapeworld_strict(prompts=[""], completions=[None], completion_ids=[[0] * 10], metadata=metas[:1])
    # A stray speck beside the right circle costs both rewards (the rule lives in score_t2i).
    speck = stamp(blank(), "circle", "blue", 4, 4)
    speck[0, 15] = color_token("blue")
    kwargs = {"prompts": [""], "completions": [None], "completion_ids": [speck.flatten().tolist()]}
    assert shapeworld_strict(**kwargs, metadata=metas[:1]) == [0.0]
    assert shapeworld_partial(**kwargs, metadata=metas[:1]) == [2 / 3]


def test_answer_reward():
    completions = ["Three", "two <pad>", "left.", [{"role": "assistant", "content": "yes"}], "red blue", "4"]
    answers = ["three", "three", "left", "yes", "red", "four"]
    got = shapeworld_answer(
        prompts=[""] * 6, completions=completions, completion_ids=[[]] * 6, answer=answers
    )
    assert got == [1.0, 0.0, 1.0, 1.0, 0.0, 1.0]
    with pytest.raises(ValueError, match="answer"):
        shapeworld_answer(prompts=[""], completions=["yes"], completion_ids=[[]])
