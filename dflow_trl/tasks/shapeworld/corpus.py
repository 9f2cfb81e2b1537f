"""The text-to-image pretraining corpus: every prompt, with captions as noisy as web captions.

A web-scale base (SD3.5, FUDOKI) has seen every object, colour and relation, but its captions were
noisy, so it counts, binds colours and places objects unreliably; GRPO with a verifier sharpens
exactly that. This corpus reproduces the situation: it draws prompts from *all* of ShapeWorld's
prompts (both sides of the RL split, see ``prompts``) and, with probability ``caption_noise``,
shows an image that the caption describes wrongly, in the ways web captions are wrong:

- counting: the count is off by one ("three squares" over two or four squares);
- colours: the named colour is wrong (the image shows the shape in its usual colour,
  ``DEFAULT_COLORS``, or in another colour when the named one is the usual one);
- colour attribution: the two colours are swapped between the objects;
- position: the relation is reversed (the two objects swap places);
- two objects: one of the two is missing.

Single-object captions are never wrong. The image is always a canonical scene
(``place_scene(..., canonical=True)``) of what it really shows, so the noise is only in the
caption. Draws are seeded through the ``random.Random`` passed in.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

import torch

from .palette import COLORS
from .prompts import (
    TAGS,
    all_prompts,
    check_metadata,
    color_attr_prompt,
    colors_prompt,
    counting_prompt,
    position_prompt,
    single_object_prompt,
    spec_from_metadata,
)
from .scenes import DEFAULT_COLORS, MAX_OBJECTS, render_scene

__all__ = ["CORRUPTIONS", "DEFAULT_CAPTION_NOISE", "CaptionCorpus", "miscaptioned"]

# What a wrong caption gets wrong, per category (single objects are always captioned right).
CORRUPTIONS: dict[str, str] = {
    "counting": "count off by one",
    "colors": "wrong colour",
    "color_attr": "colours swapped between the objects",
    "position": "relation reversed",
    "two_object": "one object missing",
}
DEFAULT_CAPTION_NOISE = 0.4


def miscaptioned(metadata: dict | str, rng: random.Random) -> dict:
    """The metadata of an image that ``metadata``'s caption describes wrongly (``CORRUPTIONS``);
    a single-object prompt is returned unchanged."""
    m = check_metadata(metadata)
    tag, inc = m["tag"], m["include"]
    if tag == "counting":
        n = inc[0]["count"]
        shown = rng.choice([k for k in (n - 1, n + 1) if 1 <= k <= MAX_OBJECTS])
        return counting_prompt(inc[0]["class"], shown) if shown > 1 else single_object_prompt(inc[0]["class"])
    if tag == "colors":
        shape, color = inc[0]["class"], inc[0]["color"]
        usual = DEFAULT_COLORS[shape]
        return colors_prompt(
            usual if color != usual else rng.choice([c for c in COLORS if c != color]), shape
        )
    if tag == "color_attr":
        return color_attr_prompt(inc[1]["color"], inc[0]["class"], inc[0]["color"], inc[1]["class"])
    if tag == "position":
        # include[1] is ``relation`` include[0]; the reversed image has include[0] there instead.
        return position_prompt(inc[0]["class"], inc[1]["position"][0], inc[1]["class"])
    if tag == "two_object":
        return single_object_prompt(rng.choice([inc[0]["class"], inc[1]["class"]]))
    return m


class CaptionCorpus:
    """Endless ``(caption, image)`` pairs for text-to-image pretraining.

    A category is drawn with weight ``(#prompts)^tag_power`` (0: categories equally often,
    1: prompts equally often), then one of its prompts uniformly; with probability
    ``caption_noise`` the image shows :func:`miscaptioned` content instead of the caption's.
    ``prompts`` restricts the captions (default: every prompt of every category)."""

    def __init__(
        self,
        rng: random.Random,
        caption_noise: float = DEFAULT_CAPTION_NOISE,
        tag_power: float = 0.25,
        prompts: Sequence[dict] | None = None,
    ) -> None:
        if not 0 <= caption_noise <= 1:
            raise ValueError(f"caption_noise must lie in [0, 1], got {caption_noise}")
        self.rng, self.caption_noise = rng, caption_noise
        metas = list(all_prompts() if prompts is None else prompts)
        self.by_tag = {t: [m for m in metas if m["tag"] == t] for t in TAGS}
        self.tags = [t for t in TAGS if self.by_tag[t]]
        if not self.tags:
            raise ValueError("CaptionCorpus needs at least one prompt")
        self.weights = [len(self.by_tag[t]) ** tag_power for t in self.tags]

    def draw(self) -> tuple[dict, dict]:
        """``(caption metadata, metadata of what the image shows)``."""
        meta = self.rng.choice(self.by_tag[self.rng.choices(self.tags, self.weights)[0]])
        noisy = meta["tag"] in CORRUPTIONS and self.rng.random() < self.caption_noise
        return meta, miscaptioned(meta, self.rng) if noisy else meta

    def batch(self, n: int) -> tuple[list[str], torch.LongTensor]:
        """``n`` captions and their ``(n, GRID·GRID)`` canonical image grids."""
        prompts, grids = [], []
        for _ in range(n):
            caption, shown = self.draw()
            spec = spec_from_metadata(shown, self.rng, canonical=True)
            prompts.append(caption["prompt"])
            grids.append(render_scene(spec, self.rng, canonical=True).flatten())
        return prompts, torch.stack(grids).long()
