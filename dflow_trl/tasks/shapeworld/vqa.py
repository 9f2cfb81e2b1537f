"""ShapeWorld understanding questions (count, colour, position, existence) with one-word answers.

Two splits, chosen with ``held_out``:

- ``"questions"`` (the default, GenEval-faithful, as the text-to-image split): train and test
  questions come from one distribution, the one pretraining draws from, and are disjoint
  instances: a question goes to the test side when a fixed hash of its text and scene falls in
  the test half (``vqa_split_of``). RL trains on one side and is scored on the other; everything
  a test question asks about was seen in pretraining.
- ``"combinations"`` (compositional generalisation): training scenes never show anything held
  out (``prompts.scene_is_train_safe``), and every test question is about a held-out combination:
  its focus object has a held-out (colour, shape) binding, or the question pairs held-out shapes,
  asks for a held-out (shape, count), or asks whether a held-out binding is present. Its train
  side, without the hash, is the pretraining pool. A base that never saw these combinations gets
  most such questions wrong on every sample (docs/shapeworld.md), which no CPU-minute RL teaches.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Callable, Iterable

from .palette import COLORS
from .prompts import (
    HELD_OUT_BINDINGS,
    HELD_OUT_COUNTS,
    HELD_OUT_PAIRS,
    NUMBER_WORDS,
    check_split,
    scene_is_train_safe,
    train_colors,
)
from .scenes import (
    MAX_OBJECTS,
    RELATIONS,
    DetectedObject,
    ObjectSpec,
    SceneSpec,
    place_scene,
    relative_position,
)
from .shapes import PLURALS, SHAPES

QTYPES: tuple[str, ...] = ("count", "color", "position", "exist")
# The answer to "where is A relative to B?" is the relation's first word.
RELATION_ANSWERS: dict[str, str] = {rel: rel.split()[0] for rel in RELATIONS}
ANSWERS: tuple[str, ...] = (
    *(NUMBER_WORDS[n] for n in sorted(NUMBER_WORDS)),
    *COLORS,
    *RELATION_ANSWERS.values(),
    "yes",
    "no",
)
QUESTION_TEMPLATES: dict[str, str] = {
    "count": "how many {plural} are there?",
    "color": "what color is the {shape}?",
    "position": "where is the {shape} relative to the {other}?",
    "exist": "is there {article} {color} {shape}?",
}

_MAX_TRIES = 1000
Obj = tuple[str, str]  # (shape, colour)


def check_qtype(qtype: str) -> str:
    if qtype not in QTYPES:
        raise ValueError(f"unknown question type {qtype!r}; expected one of {list(QTYPES)}")
    return qtype


def _colors(shape: str, split: str) -> list[str]:
    return train_colors(shape) if split == "train" else list(COLORS)


def _color_for(rng: random.Random, shape: str, split: str) -> str:
    return rng.choice(_colors(shape, split))


def _distractors(rng: random.Random, split: str, room: int, avoid: set[str]) -> list[Obj]:
    """Up to ``room`` objects of shapes not in ``avoid``, so they never change the answer."""
    shapes = [s for s in SHAPES if s not in avoid]
    return [(s, _color_for(rng, s, split)) for s in (rng.choice(shapes) for _ in range(rng.randint(0, room)))]


def _count_question(rng: random.Random, split: str) -> tuple[list[Obj], str, str]:
    if split == "test" and rng.random() < 0.5:
        shape, k = rng.choice(sorted(HELD_OUT_COUNTS))
        objs = [(shape, rng.choice(COLORS)) for _ in range(k)]
    elif split == "test":
        color, shape = rng.choice(sorted(HELD_OUT_BINDINGS))
        k = rng.randint(1, MAX_OBJECTS)
        objs = [(shape, color)] + [(shape, rng.choice(COLORS)) for _ in range(k - 1)]
    else:
        shape = rng.choice(SHAPES)
        k = rng.choice([n for n in range(1, MAX_OBJECTS + 1) if (shape, n) not in HELD_OUT_COUNTS])
        objs = [(shape, _color_for(rng, shape, split)) for _ in range(k)]
    objs += _distractors(rng, split, MAX_OBJECTS - k, {shape})
    return objs, QUESTION_TEMPLATES["count"].format(plural=PLURALS[shape]), NUMBER_WORDS[k]


def _color_question(rng: random.Random, split: str) -> tuple[list[Obj], str, str]:
    if split == "test":
        color, shape = rng.choice(sorted(HELD_OUT_BINDINGS))
    else:
        shape = rng.choice(SHAPES)
        color = rng.choice(train_colors(shape))
    objs = [(shape, color), *_distractors(rng, split, MAX_OBJECTS - 1, {shape})]
    return objs, QUESTION_TEMPLATES["color"].format(shape=shape), color


def _exist_question(rng: random.Random, split: str) -> tuple[list[Obj], str, str]:
    if split == "test":
        color, shape = rng.choice(sorted(HELD_OUT_BINDINGS))
    else:
        shape = rng.choice(SHAPES)
        color = rng.choice(train_colors(shape))
    present = rng.random() < 0.5
    # "no" scenes hold near misses (the shape in another colour, the colour on another shape),
    # so the answer needs the binding, not just the shape or the colour.
    if present:
        objs = [(shape, color)]
    else:
        # Drawn among train-safe choices in training, so "no" scenes are rejected no more often
        # than "yes" scenes and the answers stay balanced.
        other_color = rng.choice([c for c in _colors(shape, split) if c != color])
        other_shape = rng.choice([
            s for s in SHAPES
            if s != shape and color in _colors(s, split)
            and (split == "test" or {s, shape} not in HELD_OUT_PAIRS)
        ])  # fmt: skip
        objs = [(shape, other_color), (other_shape, color)]
    for s, c in _distractors(rng, split, MAX_OBJECTS - len(objs), set()):
        objs.append(
            (s, c)
            if (s, c) != (shape, color)
            else (s, rng.choice([x for x in _colors(s, split) if x != color]))
        )
    rng.shuffle(objs)
    article = "an" if color[0] in "aeiou" else "a"
    question = QUESTION_TEMPLATES["exist"].format(article=article, color=color, shape=shape)
    return objs, question, "yes" if present else "no"


def _position_question(rng: random.Random, split: str) -> tuple[list[Obj], str, str]:
    """Object 0 is the reference, object 1 the one asked about (placed relative to object 0)."""
    if split == "test" and rng.random() < 0.5:
        pair = rng.choice(sorted(HELD_OUT_PAIRS, key=sorted))
        shape, other = rng.sample(sorted(pair), 2)
        objs = [(other, rng.choice(COLORS)), (shape, rng.choice(COLORS))]
    elif split == "test":
        color, shape = rng.choice(sorted(HELD_OUT_BINDINGS))
        other = rng.choice([s for s in SHAPES if s != shape])
        objs = [(other, rng.choice(COLORS)), (shape, color)]
    else:
        shape, other = rng.sample(SHAPES, 2)
        objs = [(other, _color_for(rng, other, split)), (shape, _color_for(rng, shape, split))]
    objs += _distractors(rng, split, MAX_OBJECTS - 2, {shape, other})
    question = QUESTION_TEMPLATES["position"].format(shape=shape, other=other)
    return objs, question, rng.choice(RELATIONS)


def _scene(
    rng: random.Random, split: str, objs: list[Obj], relation: tuple[str, int, int] | None = None
) -> tuple[list[int], list[DetectedObject]] | None:
    """Place ``objs`` (``relation = (rel, a, b)``: object a is rel object b, and in no other relation)."""
    if split == "train" and not scene_is_train_safe(objs):
        return None
    specs = [ObjectSpec(s, c) for s, c in objs]
    if relation is not None:
        rel, a, b = relation
        specs[a] = ObjectSpec(objs[a][0], objs[a][1], (rel, b))
    grid, placed = place_scene(SceneSpec(tuple(specs)), rng)
    if relation is not None and (
        relative_position(placed[relation[1]].bbox, placed[relation[2]].bbox) != {relation[0]}
    ):
        return None  # a diagonal offset would make the one-word answer ambiguous
    return grid.flatten().tolist(), placed


_MAKERS: dict[str, Callable[[random.Random, str], tuple[list[Obj], str, str]]] = {
    "count": _count_question,
    "color": _color_question,
    "exist": _exist_question,
}


HELD_OUT_KINDS: tuple[str, ...] = ("questions", "combinations")
VQA_TEST_FRACTION = 0.5


def check_held_out(held_out: str) -> str:
    if held_out not in HELD_OUT_KINDS:
        raise ValueError(f"unknown held_out {held_out!r}; expected one of {list(HELD_OUT_KINDS)}")
    return held_out


def vqa_split_of(example: dict) -> str:
    """``"test"`` or ``"train"``: the side of the ``held_out="questions"`` split that a question
    (``prompt`` and ``scene_tokens``) is on, by a fixed hash of both."""
    key = f"shapeworld-vqa-split:{example['prompt']}|{','.join(map(str, example['scene_tokens']))}"
    bucket = int(hashlib.sha256(key.encode()).hexdigest()[:8], 16) / 16**8
    return "test" if bucket < VQA_TEST_FRACTION else "train"


def _draw(rng: random.Random, split: str, qtype: str) -> dict:
    """One question of ``split``'s generator in the ``"combinations"`` split."""
    for _ in range(_MAX_TRIES):
        if qtype == "position":
            objs, question, rel = _position_question(rng, split)
            scene, answer = _scene(rng, split, objs, (rel, 1, 0)), RELATION_ANSWERS[rel]
        else:
            objs, question, answer = _MAKERS[qtype](rng, split)
            scene = _scene(rng, split, objs)
        if scene is not None:
            return {"prompt": question, "scene_tokens": scene[0], "answer": answer, "qtype": qtype}
    raise RuntimeError(f"could not make a {split} {qtype} question in {_MAX_TRIES} tries")


def vqa_example(rng: random.Random, split: str, qtype: str, held_out: str = "questions") -> dict:
    """One question of ``split`` under the ``held_out`` split: ``{"prompt", "scene_tokens",
    "answer", "qtype"}``."""
    check_split(split)
    check_qtype(qtype)
    if check_held_out(held_out) == "combinations":
        return _draw(rng, split, qtype)
    for _ in range(_MAX_TRIES):
        example = _draw(rng, "train", qtype)
        if vqa_split_of(example) == split:
            return example
    raise RuntimeError(f"could not make a {split} {qtype} question in {_MAX_TRIES} tries")


def vqa_examples(
    split: str,
    n: int,
    seed: int = 0,
    qtypes: Iterable[str] | None = None,
    held_out: str = "questions",
) -> list[dict]:
    """``n`` questions of ``split`` (``held_out``: which split, see the module), question types in
    rotation; the same arguments give the same list."""
    check_split(split)
    check_held_out(held_out)
    qtypes = QTYPES if qtypes is None else tuple(check_qtype(q) for q in qtypes)
    if not qtypes:
        raise ValueError("qtypes must name at least one question type")
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    # Distinct streams per split, so a train and a test set with one seed share no draws. The
    # "combinations" stream is the one the shipped model's pretraining pool was drawn from.
    stream = "" if held_out == "combinations" else "q-"
    rng = random.Random(f"shapeworld-vqa-{stream}{split}-{seed}")
    return [vqa_example(rng, split, qtypes[i % len(qtypes)], held_out) for i in range(n)]
