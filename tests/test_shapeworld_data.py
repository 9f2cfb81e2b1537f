"""ShapeWorld task data: palette, shapes, scenes, prompts and split, datasets, questions, pictures."""

from __future__ import annotations

import itertools
import json
import random
import re

import pytest
import torch

from dflow_trl.tasks.shapeworld import (
    ANSWERS,
    CANVAS_LENGTH,
    COLORS,
    DEFAULT_COLORS,
    GRID,
    HELD_OUT_BINDINGS,
    PALETTE_SIZE,
    QTYPES,
    RELATIONS,
    SHAPES,
    SLOTS,
    TAGS,
    ObjectSpec,
    SceneSpec,
    all_prompts,
    grid_to_image,
    in_split,
    make_t2i_dataset,
    make_vqa_dataset,
    palette_embeddings,
    palette_rgb,
    parse_grid,
    relative_position,
    render_grid_strip,
    render_scene,
    scene_is_train_safe,
    score_t2i,
    spec_from_metadata,
    t2i_prompts,
    t2i_split_of,
)
from dflow_trl.tasks.shapeworld.prompts import bindings_of
from dflow_trl.tasks.shapeworld.shapes import TEMPLATES, classify_cells, mask_distance
from dflow_trl.tasks.shapeworld.vqa import vqa_split_of
from dflow_trl.tasks.shapeworld.vqa_corpus import AnswerCorpus, misanswered

# ---- palette and shapes --------------------------------------------------------------------------


def test_palette_rows_stay_distinct_after_l2_normalisation():
    emb = palette_embeddings()
    assert emb.shape == (PALETTE_SIZE, 3) and emb.dtype == torch.float32
    assert 8 <= PALETTE_SIZE <= 10 and len(COLORS) == PALETTE_SIZE - 1
    assert emb.min() >= -0.5 and emb.max() <= 0.5  # centred RGB
    assert (emb.norm(dim=1) > 0.1).all()  # every row can be normalised
    unit = emb / emb.norm(dim=1, keepdim=True)
    metric = torch.cdist(unit, unit) ** 4 + torch.eye(PALETTE_SIZE) * 10  # the path's d = ‖ê−ê'‖⁴
    assert metric.min() > 0.08
    assert metric[0].min() > 1.0  # the background is far from every colour: silhouettes resolve first


def test_templates_are_far_apart_so_tolerance_one_is_unambiguous():
    for a, b in itertools.combinations(SHAPES, 2):
        assert mask_distance(TEMPLATES[a], TEMPLATES[b]) >= 4, (a, b)
    for shape, cells in TEMPLATES.items():
        assert classify_cells(cells) == shape
        assert classify_cells({(r + 7, c + 3) for r, c in cells}) == shape  # position does not matter
    assert classify_cells({(0, 0), (0, 1)}) == "unknown"


# ---- scenes ------------------------------------------------------------------------------------


def test_render_scene_is_deterministic_and_parses_back():
    spec = SceneSpec(
        (ObjectSpec("circle", "red"), ObjectSpec("square", "blue", ("below", 0)), ObjectSpec("cross"))
    )
    grid = render_scene(spec, 7)
    assert grid.shape == (GRID, GRID) and grid.dtype == torch.long
    assert torch.equal(grid, render_scene(spec, random.Random(7)))
    objs = {o.shape: o for o in parse_grid(grid)}
    assert set(objs) == {"circle", "square", "cross"}
    assert (objs["circle"].color, objs["square"].color) == ("red", "blue")
    assert "below" in relative_position(objs["square"].bbox, objs["circle"].bbox)


def test_four_of_the_widest_shape_fit():
    spec = SceneSpec(tuple(ObjectSpec("triangle", "green") for _ in range(4)))
    for seed in range(20):
        assert [o.shape for o in parse_grid(render_scene(spec, seed))] == ["triangle"] * 4


def test_objects_sit_centred_in_distinct_slots():
    spec = SceneSpec(
        (ObjectSpec("circle", "red"), ObjectSpec("cross"), ObjectSpec("square"), ObjectSpec("diamond"))
    )
    slot = GRID // SLOTS
    for seed in range(10):
        objs = parse_grid(render_scene(spec, seed))
        slots = {(o.bbox[0] // slot, o.bbox[1] // slot) for o in objs}
        assert len(objs) == 4 and len(slots) == 4
        for o in objs:  # each object stays inside its slot's first SLOT - 1 rows and columns
            assert o.bbox[2] // slot == o.bbox[0] // slot and o.bbox[2] % slot < slot - 1
            assert o.bbox[3] // slot == o.bbox[1] // slot and o.bbox[3] % slot < slot - 1


def test_canonical_scenes_are_a_function_of_the_prompt_and_satisfy_it():
    assert all((c, s) not in HELD_OUT_BINDINGS for s, c in DEFAULT_COLORS.items()) and (
        set(DEFAULT_COLORS) == set(SHAPES)
    )
    for m in all_prompts():
        grids = [
            render_scene(spec_from_metadata(m, seed, canonical=True), seed + 1, canonical=True)
            for seed in (0, 1)
        ]
        assert torch.equal(grids[0], grids[1]), m["prompt"]
        assert score_t2i(grids[0], m)[0] == 1.0, m["prompt"]
    # An open colour takes the shape's default; the first object takes the first valid slot.
    (obj,) = parse_grid(render_scene(SceneSpec((ObjectSpec("square"),)), canonical=True))
    assert (
        obj.color == DEFAULT_COLORS["square"] and obj.bbox[0] < GRID // SLOTS and obj.bbox[1] < GRID // SLOTS
    )
    # Random placement still varies the layout.
    spec = SceneSpec((ObjectSpec("square", "red"),))
    assert len({tuple(render_scene(spec, seed).flatten().tolist()) for seed in range(20)}) > 1


def test_scene_spec_validation():
    with pytest.raises(ValueError, match="unknown shape"):
        SceneSpec((ObjectSpec("star"),))
    with pytest.raises(ValueError, match="unknown colour"):
        SceneSpec((ObjectSpec("square", "black"),))
    with pytest.raises(ValueError, match="earlier object"):
        SceneSpec((ObjectSpec("square", None, ("above", 0)),))
    with pytest.raises(ValueError, match="unknown relation"):
        SceneSpec((ObjectSpec("square"), ObjectSpec("circle", None, ("near", 0))))
    with pytest.raises(ValueError, match="1 to 4 objects"):
        SceneSpec(tuple(ObjectSpec("square") for _ in range(5)))
    with pytest.raises(ValueError, match="rng"):
        render_scene(SceneSpec((ObjectSpec("square"),)), rng="seed")


# ---- prompts and split ---------------------------------------------------------------------------


def test_geneval_wording_and_metadata():
    by_text = {m["prompt"]: m for m in all_prompts()}
    assert by_text["a photo of a red square"]["include"] == [{"class": "square", "count": 1, "color": "red"}]
    assert by_text["a photo of a circle and a triangle"]["tag"] == "two_object"
    assert by_text["a photo of three squares"] == {
        "tag": "counting",
        "include": [{"class": "square", "count": 3}],
        "exclude": [{"class": "square", "count": 4}],
        "prompt": "a photo of three squares",
    }
    assert by_text["a photo of a blue circle"]["tag"] == "colors"
    assert by_text["a photo of a square left of a circle"]["include"] == [
        {"class": "circle", "count": 1},
        {"class": "square", "count": 1, "position": ["left of", 0]},
    ]
    assert by_text["a photo of a red square and a blue triangle"]["tag"] == "color_attr"
    assert "a photo of an orange cross" in by_text
    assert len(by_text) == len(all_prompts())  # no two prompts share a text
    counts = {tag: len(all_prompts([tag])) for tag in TAGS}
    assert counts == {
        "single_object": 5, "two_object": 20, "counting": 15, "colors": 40, "position": 80, "color_attr": 1120
    }


def test_split_is_deterministic_disjoint_and_covers_every_category():
    train, test = t2i_prompts("train"), t2i_prompts("test")
    assert t2i_prompts("train") == train and t2i_prompts("test") == test
    train_texts, test_texts = {m["prompt"] for m in train}, {m["prompt"] for m in test}
    # Disjoint prompt strings that together are every prompt (the pretraining corpus holds all).
    assert not train_texts & test_texts
    assert train_texts | test_texts == {m["prompt"] for m in all_prompts()}
    for tag in TAGS:
        n = len(all_prompts([tag]))
        assert (
            len(t2i_prompts("test", [tag])) == n // 2 and len(t2i_prompts("train", [tag])) == n - n // 2
        ), tag
        assert all(t2i_split_of(m) == "test" for m in t2i_prompts("test", [tag]))
    # Both sides bind every colour and every shape in the colours category.
    for side in (train, test):
        bound = {b for m in side if m["tag"] == "colors" for b in bindings_of(m)}
        assert {c for c, _ in bound} == set(COLORS) and {s for _, s in bound} == set(SHAPES)
    with pytest.raises(ValueError, match="split"):
        in_split(train[0], "validation")
    with pytest.raises(ValueError, match="prompt"):
        t2i_split_of({k: v for k, v in train[0].items() if k != "prompt"})


def test_spec_from_metadata_counts_and_train_safety():
    m = next(m for m in all_prompts(["counting"]) if m["prompt"] == "a photo of four crosses")
    spec = spec_from_metadata(m, 0, train_safe=True)
    assert [o.shape for o in spec.objects] == ["cross"] * 4
    assert all((o.color, o.shape) not in HELD_OUT_BINDINGS for o in spec.objects)
    held = next(m for m in all_prompts(["colors"]) if m["prompt"] == "a photo of a red square")
    with pytest.raises(ValueError, match="held out"):
        spec_from_metadata(held, train_safe=True)


# ---- datasets ------------------------------------------------------------------------------------


def test_t2i_dataset_columns_and_scenes():
    ds = make_t2i_dataset("train")
    assert ds.column_names == ["prompt", "tag", "metadata"]
    assert len(ds) == len(t2i_prompts("train"))
    assert json.loads(ds[0]["metadata"])["prompt"] == ds[0]["prompt"]

    small = make_t2i_dataset("train", scenes_per_prompt=2, max_per_tag=6, seed=3)
    assert small.column_names == ["prompt", "tag", "metadata", "scene_tokens"]
    assert len(small) == 2 * sum(min(6, len(t2i_prompts("train", [t]))) for t in TAGS)
    assert small["prompt"] == make_t2i_dataset("train", scenes_per_prompt=2, max_per_tag=6, seed=3)["prompt"]
    for row in small:
        assert len(row["scene_tokens"]) == CANVAS_LENGTH
        assert score_t2i(row["scene_tokens"], row["metadata"])[0] == 1.0, row["prompt"]

    test = make_t2i_dataset("test", tags=["colors"], scenes_per_prompt=1)
    assert set(test["tag"]) == {"colors"} and len(test) == len(t2i_prompts("test", ["colors"]))
    with pytest.raises(ValueError, match="unknown tag"):
        make_t2i_dataset("train", tags=["style"])
    with pytest.raises(ValueError, match="split"):
        make_t2i_dataset("val")


_QUESTION_RES = {
    "count": re.compile(r"how many (\w+) are there\?"),
    "color": re.compile(r"what color is the (\w+)\?"),
    "position": re.compile(r"where is the (\w+) relative to the (\w+)\?"),
    "exist": re.compile(r"is there an? (\w+) (\w+)\?"),
}
_NUMBERS = {"one": 1, "two": 2, "three": 3, "four": 4}
_SINGULAR = {
    "squares": "square", "circles": "circle", "triangles": "triangle", "crosses": "cross",
    "diamonds": "diamond",
}  # fmt: skip


def _check_answer(row: dict) -> None:
    """Recompute the answer from the parsed scene."""
    objs = parse_grid(row["scene_tokens"])
    assert all(o.shape != "unknown" for o in objs)
    groups = _QUESTION_RES[row["qtype"]].fullmatch(row["prompt"]).groups()
    if row["qtype"] == "count":
        assert sum(o.shape == _SINGULAR[groups[0]] for o in objs) == _NUMBERS[row["answer"]]
    elif row["qtype"] == "color":
        (only,) = [o for o in objs if o.shape == groups[0]]
        assert only.color == row["answer"]
    elif row["qtype"] == "position":
        (a,) = [o for o in objs if o.shape == groups[0]]
        (b,) = [o for o in objs if o.shape == groups[1]]
        assert {r.split()[0] for r in relative_position(a.bbox, b.bbox)} == {row["answer"]}
    else:
        present = any((o.color, o.shape) == groups for o in objs)
        assert row["answer"] == ("yes" if present else "no")


def test_vqa_datasets():
    train = make_vqa_dataset("train", n=200, seed=1)
    assert train.column_names == ["prompt", "scene_tokens", "answer", "qtype"]
    assert train["answer"] == make_vqa_dataset("train", n=200, seed=1)["answer"]
    assert set(train["qtype"]) == set(QTYPES)
    assert set(train["answer"]) <= set(ANSWERS)
    assert {a for a, q in zip(train["answer"], train["qtype"]) if q == "exist"} == {"yes", "no"}
    assert {a for a, q in zip(train["answer"], train["qtype"]) if q == "position"} == {
        r.split()[0] for r in RELATIONS
    }
    for row in train:
        _check_answer(row)
        assert scene_is_train_safe([(o.shape, o.color) for o in parse_grid(row["scene_tokens"])])

    test = make_vqa_dataset("test", n=120, seed=1, held_out="combinations")
    for row in test:
        _check_answer(row)
        safe = scene_is_train_safe([(o.shape, o.color) for o in parse_grid(row["scene_tokens"])])
        asks_held_out = (
            row["qtype"] == "exist"
            and tuple(_QUESTION_RES["exist"].fullmatch(row["prompt"]).groups()) in HELD_OUT_BINDINGS
        )
        assert not safe or asks_held_out, row["prompt"]
    assert len(make_vqa_dataset("test", n=4, qtypes=["color"])) == 4
    with pytest.raises(ValueError, match="question type"):
        make_vqa_dataset("train", n=4, qtypes=["shape"])
    with pytest.raises(ValueError, match="held_out"):
        make_vqa_dataset("train", n=4, held_out="scenes")


def test_vqa_question_split_is_disjoint_and_in_distribution():
    """The default split: both sides draw from one distribution (train-safe scenes, what pretraining
    draws from), every question lies on its side of the hash, and no test question is a training one."""
    train = make_vqa_dataset("train", n=400, seed=2)
    test = make_vqa_dataset("test", n=200, seed=2)
    assert test["answer"] == make_vqa_dataset("test", n=200, seed=2)["answer"]
    assert {vqa_split_of(r) for r in train} == {"train"}
    assert {vqa_split_of(r) for r in test} == {"test"}
    seen = {(r["prompt"], tuple(r["scene_tokens"])) for r in train}
    assert not any((r["prompt"], tuple(r["scene_tokens"])) in seen for r in test)
    for row in test:
        _check_answer(row)
        assert scene_is_train_safe([(o.shape, o.color) for o in parse_grid(row["scene_tokens"])])
    assert set(test["qtype"]) == set(QTYPES)
    # The hash halves the distribution: about half of the pretraining pool is on each side.
    pool = make_vqa_dataset("train", n=1000, seed=0, held_out="combinations")
    share = sum(vqa_split_of(r) == "test" for r in pool) / len(pool)
    assert 0.4 < share < 0.6


def test_misanswered_is_wrong_the_documented_way():
    rng = random.Random(0)
    rows = make_vqa_dataset("train", n=200, seed=3)
    opposite = {"left": "right", "right": "left", "above": "below", "below": "above"}
    for row in rows:
        wrong = misanswered(row, rng)
        assert wrong != row["answer"] and wrong in ANSWERS
        if row["qtype"] == "count":
            numbers = ["one", "two", "three", "four"]
            assert abs(numbers.index(wrong) - numbers.index(row["answer"])) == 1
        elif row["qtype"] == "position":
            assert wrong == opposite[row["answer"]]
        elif row["qtype"] == "exist":
            assert {wrong, row["answer"]} == {"yes", "no"}
        else:
            shape = row["prompt"].split()[-1].rstrip("?")
            assert wrong == DEFAULT_COLORS[shape] or row["answer"] == DEFAULT_COLORS[shape]
    corpus = AnswerCorpus(random.Random(1), rows.to_list(), answer_noise=0.3)
    truth = {(r["prompt"], tuple(r["scene_tokens"])): r["answer"] for r in rows}
    draws = [corpus.draw() for _ in range(4000)]
    wrong_rate = sum(a != ex["answer"] for ex, a in draws) / len(draws)
    # 5 standard errors of a Bernoulli(0.3) mean over 4000 draws.
    assert abs(wrong_rate - 0.3) < 5 * (0.3 * 0.7 / 4000) ** 0.5
    assert all(truth[(ex["prompt"], tuple(ex["scene_tokens"]))] == ex["answer"] for ex, _ in draws)
    clean = AnswerCorpus(random.Random(1), rows.to_list(), answer_noise=0.0)
    assert all(a == ex["answer"] for ex, a in (clean.draw() for _ in range(200)))
    with pytest.raises(ValueError, match="answer_noise"):
        AnswerCorpus(random.Random(0), rows.to_list(), answer_noise=1.5)


# ---- pictures ------------------------------------------------------------------------------------


def test_grid_to_image_and_strip():
    grid = render_scene(SceneSpec((ObjectSpec("square", "red"),)), 0)
    img = grid_to_image(grid, scale=4)
    assert img.size == (GRID * 4, GRID * 4) and img.mode == "RGB"
    r, c = (grid == 1).nonzero()[0].tolist()
    assert img.getpixel((c * 4 + 1, r * 4 + 1)) == tuple(round(v * 255) for v in palette_rgb()[1])
    one_row = render_grid_strip([grid, grid.flatten().tolist()], labels=["before", "after"], scale=2)
    no_labels = render_grid_strip([grid.tolist(), grid.numpy()], scale=2)
    assert no_labels.size == (one_row.size[0], one_row.size[1] - 12)
    two_rows = render_grid_strip([[grid, grid], [grid, grid]], row_labels=["seed 0", "seed 1"], scale=2)
    marked = render_grid_strip([[grid, grid]], scale=2, marks=[[True, False]]).convert("RGB")
    x0 = 4  # the first grid's left edge: one gap in
    assert marked.getpixel((x0 - 1, 10)) == (0, 170, 0)
    assert marked.getpixel((x0 + 32 + 4 - 1, 10)) == (220, 0, 0)
    assert render_grid_strip([[grid, grid]], scale=2, marks=[[None, None]]).getpixel((x0 - 1, 10)) == (
        255, 255, 255
    )
    with pytest.raises(ValueError, match="one entry per grid"):
        render_grid_strip([[grid, grid]], marks=[[True]])
    cell, gap = GRID * 2, 4
    assert one_row.size == (2 * cell + 3 * gap, cell + 2 * gap + 12)  # a caption line under the row
    assert two_rows.size[1] == 2 * cell + 3 * gap and two_rows.size[0] > one_row.size[0]  # labels on the left
    with pytest.raises(ValueError, match="labels"):
        render_grid_strip([grid], labels=["a", "b"])
    with pytest.raises(ValueError, match="scale"):
        grid_to_image(grid, scale=0)
