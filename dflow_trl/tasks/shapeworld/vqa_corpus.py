"""The understanding pretraining corpus: questions with answers as noisy as a careless annotator's.

The text-to-image corpus (``corpus``) makes a base that has seen everything but learned it from
noisy captions, so RL has something to sharpen. This is the same for understanding: questions come
from a fixed pool (``vqa``), and with probability ``answer_noise`` a draw carries a wrong answer,
wrong the way a hurried annotator is wrong:

- count: off by one ("three" for two or four);
- colour: the shape's usual colour (``DEFAULT_COLORS``), or another colour when that is the answer;
- position: the opposite relation ("left" for "right", "above" for "below");
- existence: flipped.

The noise is drawn afresh at every draw, so the same question is answered right most of the time
and wrongly some of it: a model trained to convergence puts about ``1 − answer_noise`` of its mass
on the right answer, and its most likely answer stays the right one.
"""

from __future__ import annotations

import random
import re
from collections.abc import Sequence

from .palette import COLORS
from .prompts import NUMBER_WORDS
from .scenes import DEFAULT_COLORS, MAX_OBJECTS
from .vqa import QUESTION_TEMPLATES, check_qtype

__all__ = ["ANSWER_CORRUPTIONS", "DEFAULT_ANSWER_NOISE", "AnswerCorpus", "misanswered"]

ANSWER_CORRUPTIONS: dict[str, str] = {
    "count": "count off by one",
    "color": "the shape's usual colour",
    "position": "opposite relation",
    "exist": "yes and no swapped",
}
DEFAULT_ANSWER_NOISE = 0.4
_OPPOSITE = {"left": "right", "right": "left", "above": "below", "below": "above"}
_COUNT_OF = {w: n for n, w in NUMBER_WORDS.items()}
# Read back from the template the questions are written with, so the two cannot drift apart.
_COLOR_QUESTION = re.compile(re.escape(QUESTION_TEMPLATES["color"]).replace(re.escape("{shape}"), r"(\w+)"))


def misanswered(example: dict, rng: random.Random) -> str:
    """A wrong answer to ``example`` (``prompt``, ``answer``, ``qtype``), per ``ANSWER_CORRUPTIONS``."""
    qtype, answer = check_qtype(example["qtype"]), example["answer"]
    if qtype == "count":
        n = _COUNT_OF[answer]
        return NUMBER_WORDS[rng.choice([k for k in (n - 1, n + 1) if 1 <= k <= MAX_OBJECTS])]
    if qtype == "color":
        match = _COLOR_QUESTION.fullmatch(example["prompt"])
        if match is None:
            raise ValueError(f"not a colour question: {example['prompt']!r}")
        usual = DEFAULT_COLORS[match.group(1)]
        return usual if answer != usual else rng.choice([c for c in COLORS if c != answer])
    if qtype == "position":
        return _OPPOSITE[answer]
    return "no" if answer == "yes" else "yes"


class AnswerCorpus:
    """Endless ``(question, scene, answer)`` draws from ``examples`` (with replacement); with
    probability ``answer_noise`` the answer is :func:`misanswered`."""

    def __init__(
        self, rng: random.Random, examples: Sequence[dict], answer_noise: float = DEFAULT_ANSWER_NOISE
    ) -> None:
        if not 0 <= answer_noise <= 1:
            raise ValueError(f"answer_noise must lie in [0, 1], got {answer_noise}")
        if not examples:
            raise ValueError("AnswerCorpus needs at least one question")
        self.rng, self.examples, self.answer_noise = rng, list(examples), answer_noise

    def draw(self) -> tuple[dict, str]:
        """``(example, the answer this draw carries)``."""
        ex = self.examples[self.rng.randrange(len(self.examples))]
        # No draw from the rng for noise 0, so a noise-free corpus replays the earlier sampler.
        noisy = self.answer_noise > 0 and self.rng.random() < self.answer_noise
        return ex, misanswered(ex, self.rng) if noisy else ex["answer"]
