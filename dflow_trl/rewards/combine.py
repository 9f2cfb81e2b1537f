"""Guarding reward functions: failures name the reward and batch, bad return values are refused."""

from __future__ import annotations

import functools
import math
import numbers
from typing import Any

from . import RewardFunc


def get_callable_name(func: Any) -> str:
    """The name TRL logs a reward under (``rewards/<name>/mean``), mirroring
    ``trl.trainer.utils.get_callable_name``."""
    while isinstance(func, functools.partial):
        func = func.func
    return getattr(func, "__name__", type(func).__name__)


def _describe(prompt: Any, limit: int = 60) -> str:
    text = prompt if isinstance(prompt, str) else repr(prompt)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def validate_rewards(values: Any, n: int, name: str) -> list[float | None]:
    """Check one reward function's output: n numbers (or None), all finite; return them as floats."""
    if hasattr(values, "tolist") and not isinstance(values, list):  # numpy arrays and tensors
        values = values.tolist()
    if not isinstance(values, (list, tuple)):
        raise TypeError(
            f"reward function {name!r} returned a {type(values).__name__}; it must return a list of floats"
        )
    if len(values) != n:
        raise ValueError(
            f"reward function {name!r} returned {len(values)} rewards for {n} completions; "
            "return exactly one per "
            "completion (None where the reward does not apply)"
        )
    checked: list[float | None] = []
    for index, value in enumerate(values):
        if value is None:
            checked.append(None)
            continue
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise TypeError(
                f"reward function {name!r} returned {value!r} ({type(value).__name__}) for sample {index}; "
                "rewards must be int, float or None"
            )
        if not math.isfinite(value):
            raise ValueError(
                f"reward function {name!r} returned {value} for sample {index}; rewards must be finite "
                "(return None to mark a sample the reward does not apply to)"
            )
        checked.append(float(value))
    return checked


def checked_reward(func: RewardFunc) -> RewardFunc:
    """Wrap a TRL reward function so that an exception is re-raised naming it and the failing batch,
    and its output is validated (length, types, finiteness). The wrapper keeps the function's ``__name__``."""
    name = get_callable_name(func)

    def wrapper(*args: Any, **kwargs: Any) -> list[float | None]:
        # TRL passes everything by keyword; a function may take only some of them, so forward as given.
        prompts = kwargs["prompts"] if "prompts" in kwargs else (args[0] if args else [])
        completions = (
            kwargs["completions"] if "completions" in kwargs else (args[1] if len(args) > 1 else prompts)
        )
        n = len(completions)
        try:
            values = func(*args, **kwargs)
        except Exception as error:
            shown = ", ".join(repr(_describe(p)) for p in list(prompts)[:3])
            raise RuntimeError(
                f"reward function {name!r} failed on a batch of {n} samples (first prompts: {shown}): "
                f"{type(error).__name__}: {error}"
            ) from error
        return validate_rewards(values, n, name)

    functools.update_wrapper(wrapper, func, assigned=("__module__", "__doc__"), updated=())
    wrapper.__name__ = name
    wrapper.__wrapped__ = func
    return wrapper
