"""A placebo reward: a seeded coin flip per completion, independent of what was generated.

Its expected reward is the same constant ``p`` under every policy, so the true policy gradient is
zero and whatever training on it does to a model is the gradient estimator's noise alone (the
"noise damage" a real run pays on top of its signal). Training once on the real reward and once on
``placebo`` from the same base, with the same settings and evaluation, separates the two: a real
run's change is roughly its signal minus that damage.
"""

from __future__ import annotations

import random
from typing import Any


class PlaceboReward:
    """``R ~ Bernoulli(p)`` per completion, from a generator seeded once with ``seed`` (registry name
    ``"placebo"``)."""

    def __init__(self, p: float = 0.5, seed: int = 0) -> None:
        if not 0.0 < p < 1.0:
            raise ValueError(f"placebo reward probability p must lie in (0, 1), got {p}")
        self.p = float(p)
        self._rng = random.Random(seed)
        self.__name__ = "placebo"

    def __call__(self, prompts: list[Any], completions: list[Any], **kwargs: Any) -> list[float]:
        return [float(self._rng.random() < self.p) for _ in completions]
