"""``datasets.Dataset`` builders of the ShapeWorld task: text-to-image prompts and understanding questions.

Dataset columns follow what TRL expects: ``prompt`` is the text condition, every other column is
passed to reward functions as a list. The image condition of a question is ``scene_tokens`` (256
ints, row-major), not ``image``/``images``, which TRL would treat as pixel inputs. ``metadata`` is
a JSON string: Arrow cannot hold GenEval's mixed-type ``["left of", 0]`` lists, and a string
passes through ``datasets`` and TRL unchanged; the scorer accepts either form.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterable

from datasets import Dataset

from .prompts import TAGS, check_split, check_tag, spec_from_metadata, t2i_prompts
from .scenes import render_scene
from .vqa import vqa_examples

__all__ = ["VQA_DEFAULT_SIZES", "make_t2i_dataset", "make_vqa_dataset"]

VQA_DEFAULT_SIZES: dict[str, int] = {"train": 4000, "test": 1000}


def make_t2i_dataset(
    split: str,
    tags: Iterable[str] | None = None,
    scenes_per_prompt: int = 0,
    max_per_tag: int | None = None,
    seed: int = 0,
) -> Dataset:
    """Text-to-image prompts of ``split`` with columns ``prompt``, ``tag``, ``metadata`` (JSON).

    ``scenes_per_prompt = k > 0`` repeats each prompt ``k`` times with a rendered scene in
    ``scene_tokens`` (256 ints), each a random layout that satisfies the prompt exactly.
    ``max_per_tag`` keeps a seeded random subset of each tag's prompts (in their original
    order) to balance the categories: colour attribution alone has hundreds of prompts.
    """
    check_split(split)
    if scenes_per_prompt < 0:
        raise ValueError(f"scenes_per_prompt must be >= 0, got {scenes_per_prompt}")
    if max_per_tag is not None and max_per_tag < 1:
        raise ValueError(f"max_per_tag must be >= 1 or None, got {max_per_tag}")
    tags = TAGS if tags is None else tuple(check_tag(t) for t in tags)
    rng = random.Random(f"shapeworld-t2i-{split}-{seed}")
    metas: list[dict] = []
    for tag in tags:
        of_tag = t2i_prompts(split, [tag])
        if max_per_tag is not None and len(of_tag) > max_per_tag:
            keep = set(rng.sample(range(len(of_tag)), max_per_tag))
            of_tag = [m for i, m in enumerate(of_tag) if i in keep]
        metas += of_tag
    rows: dict[str, list] = {"prompt": [], "tag": [], "metadata": []}
    if scenes_per_prompt:
        rows["scene_tokens"] = []
    for m in metas:
        for _ in range(max(scenes_per_prompt, 1)):
            rows["prompt"].append(m["prompt"])
            rows["tag"].append(m["tag"])
            rows["metadata"].append(json.dumps(m))
            if scenes_per_prompt:
                spec = spec_from_metadata(m, rng)
                rows["scene_tokens"].append(render_scene(spec, rng).flatten().tolist())
    return Dataset.from_dict(rows)


def make_vqa_dataset(
    split: str,
    n: int | None = None,
    seed: int = 0,
    qtypes: Iterable[str] | None = None,
    held_out: str = "questions",
) -> Dataset:
    """Understanding questions with columns ``prompt`` (the question), ``scene_tokens`` (256 ints),
    ``answer`` (one word) and ``qtype``; ``n`` defaults to ``VQA_DEFAULT_SIZES[split]``.
    ``held_out``: ``"questions"`` (disjoint questions of one distribution) or ``"combinations"``
    (test questions about combinations no training scene shows); see ``vqa``."""
    check_split(split)
    rows = vqa_examples(split, VQA_DEFAULT_SIZES[split] if n is None else n, seed, qtypes, held_out)
    columns = ("prompt", "scene_tokens", "answer", "qtype")
    return Dataset.from_dict({c: [r[c] for r in rows] for c in columns})
