"""ShapeWorld reward functions with TRL's signature.

TRL calls ``reward(prompts=..., completions=..., completion_ids=..., **columns)`` where every
dataset column other than ``prompt`` arrives as a list, one entry per completion. The image
rewards score the final canvas in ``completion_ids`` (256 palette tokens each; ``completions``,
PIL pictures of the same grids, are ignored) against the ``metadata`` column. The answer reward
compares the decoded text in ``completions`` with the ``answer`` column.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from .scoring import score_t2i
from .tokenizer import normalize_answer


def _check_lengths(name: str, n: int, column: str, values: Sequence[Any] | None) -> Sequence[Any]:
    if values is None:
        raise ValueError(f"{name} needs the dataset column {column!r}")
    if len(values) != n:
        raise ValueError(f"{name} got {n} completions but {len(values)} {column!r} entries")
    return values


def _score_all(
    name: str, completion_ids: Sequence[Any], metadata: Sequence[Any] | None, which: int
) -> list[float]:
    metadata = _check_lengths(name, len(completion_ids), "metadata", metadata)
    return [score_t2i(ids, meta)[which] for ids, meta in zip(completion_ids, metadata)]


def shapeworld_strict(
    prompts: Sequence[Any],
    completions: Sequence[Any],
    completion_ids: Sequence[Any],
    metadata: Sequence[Any] | None = None,
    **kwargs: Any,
) -> list[float]:
    """1.0 where the canvas meets every constraint of its prompt (GenEval's strict score), else 0.0."""
    return _score_all("shapeworld_strict", completion_ids, metadata, 0)


def shapeworld_partial(
    prompts: Sequence[Any],
    completions: Sequence[Any],
    completion_ids: Sequence[Any],
    metadata: Sequence[Any] | None = None,
    **kwargs: Any,
) -> list[float]:
    """The fraction of the prompt's constraints the canvas meets: a dense reward in [0, 1]."""
    return _score_all("shapeworld_partial", completion_ids, metadata, 1)


def _completion_text(completion: Any) -> str:
    # Conversational completions are lists of messages; the reply is the last one's content.
    if isinstance(completion, list) and completion and isinstance(completion[-1], dict):
        completion = completion[-1].get("content", "")
    if not isinstance(completion, str):
        raise ValueError(f"shapeworld_answer needs text completions, got {type(completion).__name__}")
    return completion


def shapeworld_answer(
    prompts: Sequence[Any],
    completions: Sequence[Any],
    completion_ids: Sequence[Any],
    answer: Sequence[str] | None = None,
    **kwargs: Any,
) -> list[float]:
    """1.0 where the decoded answer equals the reference after normalisation (case, punctuation,
    special tokens, digits as words), else 0.0."""
    answer = _check_lengths("shapeworld_answer", len(completions), "answer", answer)
    return [
        float(normalize_answer(_completion_text(c)) == normalize_answer(a))
        for c, a in zip(completions, answer)
    ]
