"""ShapeWorld text-to-image prompts in GenEval's six categories, their metadata, and the
deterministic train/test split.

Metadata follows GenEval's format, e.g. for "a photo of a square left of a circle"::

    {"tag": "position", "include": [{"class": "circle", "count": 1},
                                    {"class": "square", "count": 1, "position": ["left of", 0]}],
     "exclude": [], "prompt": "a photo of a square left of a circle"}

``include`` entries ask for at least ``count`` objects of ``class`` (of ``color``, and
``position`` relative to the objects of an earlier include entry); ``exclude`` entries ask for
fewer than ``count`` (counting prompts pair "≥ n" with "< n + 1", i.e. exactly n).

Split (GenEval-faithful): the pretraining corpus holds every prompt of every category, so every
object, colour, count and relation, and every pair of them, is seen in pretraining (with noisy
captions, see ``corpus``). The split only separates the prompt *strings* RL trains on from those
it is evaluated on, the way Flow-GRPO's GenEval training prompts are disjoint from GenEval's
test prompts: per category, the prompts are ordered by a fixed hash of their text and the first
half (rounded down) are test prompts. ``t2i_prompts("train")`` and ``t2i_prompts("test")`` are
therefore disjoint and both cover all six categories.

The ``HELD_OUT_*`` combinations are the understanding task's split (``vqa``): its test questions
ask about combinations its training scenes never show.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import json
import random
from collections.abc import Iterable, Sequence
from typing import Any

from .palette import COLORS, color_token
from .scenes import MAX_OBJECTS, RELATIONS, ObjectSpec, SceneSpec, as_rng, check_relation
from .shapes import PLURALS, SHAPES, check_shape

TAGS: tuple[str, ...] = ("single_object", "two_object", "counting", "colors", "position", "color_attr")
SPLITS: tuple[str, ...] = ("train", "test")
NUMBER_WORDS: dict[int, str] = {1: "one", 2: "two", 3: "three", 4: "four"}
COUNTING_COUNTS: tuple[int, ...] = (2, 3, 4)  # GenEval's counting prompts ask for 2 to 4

# Each shape loses two colours and each colour at most two shapes, so every colour and every
# shape is still seen in training with several partners.
HELD_OUT_BINDINGS: frozenset[tuple[str, str]] = frozenset({
    ("red", "square"), ("cyan", "square"),
    ("orange", "circle"), ("blue", "circle"),
    ("yellow", "triangle"), ("purple", "triangle"),
    ("green", "cross"), ("pink", "cross"),
    ("red", "diamond"), ("green", "diamond"),
})  # fmt: skip
HELD_OUT_PAIRS: frozenset[frozenset[str]] = frozenset({
    frozenset({"square", "triangle"}), frozenset({"circle", "cross"}), frozenset({"triangle", "diamond"}),
})  # fmt: skip
# One count per shape; every count is still trained with three or four shapes.
HELD_OUT_COUNTS: frozenset[tuple[str, int]] = frozenset({
    ("square", 3), ("circle", 4), ("triangle", 2), ("cross", 3), ("diamond", 4),
})  # fmt: skip


def _a(phrase: str) -> str:
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def _meta(
    tag: str, include: list[dict[str, Any]], prompt: str, exclude: list[dict[str, Any]] | None = None
) -> dict:
    return {"tag": tag, "include": include, "exclude": exclude or [], "prompt": prompt}


def single_object_prompt(shape: str) -> dict:
    return _meta("single_object", [{"class": shape, "count": 1}], f"a photo of {_a(shape)}")


def two_object_prompt(shape_a: str, shape_b: str) -> dict:
    include = [{"class": shape_a, "count": 1}, {"class": shape_b, "count": 1}]
    return _meta("two_object", include, f"a photo of {_a(shape_a)} and {_a(shape_b)}")


def counting_prompt(shape: str, count: int) -> dict:
    include = [{"class": shape, "count": count}]
    exclude = [{"class": shape, "count": count + 1}]
    return _meta("counting", include, f"a photo of {NUMBER_WORDS[count]} {PLURALS[shape]}", exclude)


def colors_prompt(color: str, shape: str) -> dict:
    return _meta(
        "colors", [{"class": shape, "count": 1, "color": color}], f"a photo of {_a(f'{color} {shape}')}"
    )


def position_prompt(shape_a: str, relation: str, shape_b: str) -> dict:
    # GenEval lists the reference object first and points the located one back at it.
    include = [{"class": shape_b, "count": 1}, {"class": shape_a, "count": 1, "position": [relation, 0]}]
    return _meta("position", include, f"a photo of {_a(shape_a)} {relation} {_a(shape_b)}")


def color_attr_prompt(color_a: str, shape_a: str, color_b: str, shape_b: str) -> dict:
    include = [
        {"class": shape_a, "count": 1, "color": color_a},
        {"class": shape_b, "count": 1, "color": color_b},
    ]
    return _meta(
        "color_attr", include, f"a photo of {_a(f'{color_a} {shape_a}')} and {_a(f'{color_b} {shape_b}')}"
    )


def all_prompts(tags: Iterable[str] | None = None) -> list[dict]:
    """Every prompt's metadata, in a fixed order (by tag, then by shape/colour/relation index)."""
    tags = TAGS if tags is None else tuple(check_tag(t) for t in tags)
    ordered_pairs = list(itertools.permutations(SHAPES, 2))
    out: list[dict] = []
    for tag in tags:
        if tag == "single_object":
            out += [single_object_prompt(s) for s in SHAPES]
        elif tag == "two_object":
            out += [two_object_prompt(a, b) for a, b in ordered_pairs]
        elif tag == "counting":
            out += [counting_prompt(s, n) for s in SHAPES for n in COUNTING_COUNTS]
        elif tag == "colors":
            out += [colors_prompt(c, s) for s in SHAPES for c in COLORS]
        elif tag == "position":
            out += [position_prompt(a, rel, b) for a, b in ordered_pairs for rel in RELATIONS]
        else:
            out += [
                color_attr_prompt(ca, a, cb, b)
                for a, b in ordered_pairs
                for ca, cb in itertools.permutations(COLORS, 2)
            ]
    return out


def check_tag(tag: str) -> str:
    if tag not in TAGS:
        raise ValueError(f"unknown tag {tag!r}; expected one of {list(TAGS)}")
    return tag


def check_split(split: str) -> str:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {list(SPLITS)}")
    return split


def check_metadata(metadata: dict | str) -> dict:
    """Metadata (a dict or its JSON string) validated: known tag, classes, colours, relations."""
    if isinstance(metadata, str):
        try:
            metadata = json.loads(metadata)
        except json.JSONDecodeError as e:
            raise ValueError(f"metadata is not valid JSON: {e}") from None
    if not isinstance(metadata, dict):
        raise ValueError(f"metadata must be a dict or a JSON object string, got {type(metadata).__name__}")
    check_tag(metadata.get("tag"))
    include = metadata.get("include")
    if not isinstance(include, list) or not include:
        raise ValueError("metadata needs a non-empty 'include' list")
    for kind, reqs in (("include", include), ("exclude", metadata.get("exclude", []))):
        for i, req in enumerate(reqs):
            if not isinstance(req, dict):
                raise ValueError(f"{kind}[{i}] must be a dict, got {req!r}")
            check_shape(req.get("class"))
            count = req.get("count")
            if not isinstance(count, int) or isinstance(count, bool) or count < 1:
                raise ValueError(f"{kind}[{i}] needs a positive int 'count', got {count!r}")
            if req.get("color") is not None:
                color_token(req["color"])
            if "position" in req:
                if kind == "exclude":
                    raise ValueError("exclude entries cannot carry a position")
                pos = req["position"]
                if not (isinstance(pos, (list, tuple)) and len(pos) == 2):
                    raise ValueError(f"include[{i}]['position'] must be [relation, index], got {pos!r}")
                check_relation(pos[0])
                if not (isinstance(pos[1], int) and 0 <= pos[1] < i):
                    raise ValueError(
                        f"include[{i}]'s position must point to an earlier entry, got {pos[1]!r}"
                    )
    return metadata


def bindings_of(metadata: dict) -> set[tuple[str, str]]:
    return {(r["color"], r["class"]) for r in metadata["include"] if r.get("color") is not None}


def is_held_out(metadata: dict | str) -> bool:
    """Whether the prompt combines things the understanding task holds out of its training scenes
    (``HELD_OUT_*``; the text-to-image split is ``t2i_split_of``)."""
    m = check_metadata(metadata)
    classes = {r["class"] for r in m["include"]}
    return (
        bool(bindings_of(m) & HELD_OUT_BINDINGS)
        or any(pair <= classes for pair in HELD_OUT_PAIRS)
        or (m["tag"] == "counting" and any((r["class"], r["count"]) in HELD_OUT_COUNTS for r in m["include"]))
    )


T2I_TEST_FRACTION = 0.5


def _split_key(prompt: str) -> str:
    return hashlib.sha256(f"shapeworld-t2i-split:{prompt}".encode()).hexdigest()


@functools.cache
def _t2i_test_prompts() -> frozenset[str]:
    test: set[str] = set()
    for tag in TAGS:
        ordered = sorted((m["prompt"] for m in all_prompts([tag])), key=_split_key)
        test.update(ordered[: int(len(ordered) * T2I_TEST_FRACTION)])
    return frozenset(test)


def t2i_split_of(metadata: dict | str) -> str:
    """``"test"`` or ``"train"``: which side of the text-to-image split a prompt is on."""
    prompt = check_metadata(metadata).get("prompt")
    if not isinstance(prompt, str):
        raise ValueError("metadata needs its 'prompt' string to tell which split it is in")
    return "test" if prompt in _t2i_test_prompts() else "train"


def in_split(metadata: dict | str, split: str) -> bool:
    return t2i_split_of(metadata) == check_split(split)


def t2i_prompts(split: str, tags: Iterable[str] | None = None) -> list[dict]:
    """The metadata of the ``split``'s prompts, in ``all_prompts`` order."""
    return [m for m in all_prompts(tags) if in_split(m, split)]


def scene_is_train_safe(objects: Sequence[tuple[str, str]]) -> bool:
    """Whether a scene of ``(shape, colour)`` objects shows nothing held out: no held-out binding,
    no held-out shape pair together, no held-out (shape, count) as that shape's exact count."""
    shapes = [s for s, _ in objects]
    if any((c, s) in HELD_OUT_BINDINGS for s, c in objects):
        return False
    if any(pair <= set(shapes) for pair in HELD_OUT_PAIRS):
        return False
    return not any((s, shapes.count(s)) in HELD_OUT_COUNTS for s in set(shapes))


def train_colors(shape: str) -> list[str]:
    """The colours a ``shape`` may take in training images."""
    return [c for c in COLORS if (c, shape) not in HELD_OUT_BINDINGS]


def spec_from_metadata(
    metadata: dict | str,
    rng: random.Random | int | None = None,
    train_safe: bool = False,
    canonical: bool = False,
) -> SceneSpec:
    """A scene that satisfies the prompt exactly: ``count`` objects per include entry (so the
    exclude entries hold too), unspecified colours drawn at random (left open with
    ``canonical``, for ``place_scene(..., canonical=True)`` to fill with the shape's default).

    ``train_safe`` draws those colours from the non-held-out ones only, for training images; a
    held-out prompt then raises ``ValueError``.
    """
    m = check_metadata(metadata)
    rng = as_rng(rng)
    if train_safe and is_held_out(m):
        raise ValueError(f"prompt {m.get('prompt')!r} is held out of training; it has no train-safe scene")
    objects: list[ObjectSpec] = []
    first_of_entry: list[int] = []
    for req in m["include"]:
        first_of_entry.append(len(objects))
        relation = None
        if "position" in req:
            rel, j = req["position"]
            relation = (rel, first_of_entry[j])
        for _ in range(req["count"]):
            color = req.get("color")
            if color is None and not canonical:
                color = rng.choice(train_colors(req["class"]) if train_safe else COLORS)
            objects.append(ObjectSpec(req["class"], color, relation))
    if len(objects) > MAX_OBJECTS:
        raise ValueError(f"prompt asks for {len(objects)} objects; scenes hold at most {MAX_OBJECTS}")
    return SceneSpec(tuple(objects))
