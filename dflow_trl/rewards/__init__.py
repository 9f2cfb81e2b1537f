"""Reward functions for dflow-trl, in TRL's signature ``f(prompts, completions, completion_ids, **columns)``.

``get_reward_function("pickscore")`` builds a reward by registry name; heavy modules and models load only
when a reward is asked for (models on its first call).
"""

from __future__ import annotations

import functools
import importlib
from collections.abc import Callable
from typing import Any

RewardFunc = Callable[..., list[float | None]]


def _lazy(module: str, attr: str) -> Callable[..., RewardFunc]:
    """A factory that imports ``dflow_trl.rewards.<module>`` only when called."""

    def factory(**kwargs: Any) -> RewardFunc:
        return getattr(importlib.import_module(f"{__name__}.{module}"), attr)(**kwargs)

    factory.__name__ = attr
    factory.__doc__ = f"Build the reward ``{module}.{attr}`` (imported on first use)."
    return factory


def _lazy_function(module: str, attr: str) -> Callable[..., RewardFunc]:
    """For modules exposing reward functions rather than factories; kwargs are bound with a partial."""

    def factory(**kwargs: Any) -> RewardFunc:
        try:
            func = getattr(importlib.import_module(f"{__name__}.{module}"), attr)
        except (ImportError, AttributeError) as error:
            raise ImportError(
                f"reward {attr!r} needs dflow_trl.rewards.{module}.{attr}, which is unavailable: {error}"
            ) from error
        if not kwargs:
            return func
        bound = functools.partial(func, **kwargs)
        bound.__name__ = attr  # type: ignore[attr-defined]
        return bound

    factory.__name__ = attr
    return factory


REWARD_REGISTRY: dict[str, Callable[..., RewardFunc]] = {
    "pickscore": _lazy("clip_scorers", "pickscore"),
    "clip_score": _lazy("clip_scorers", "clip_score"),
    "aesthetic": _lazy("aesthetic", "aesthetic"),
    "geneval": _lazy("geneval", "geneval"),
    "ocr": _lazy("ocr", "ocr"),
    "mc_letter": _lazy("answers", "mc_letter"),
    "exact_match": _lazy("answers", "exact_match"),
    "numeric_match": _lazy("answers", "numeric_match"),
    "format": _lazy("answers", "format_reward"),
    "remote": _lazy("remote", "remote"),
    "shapeworld_strict": _lazy_function("shapeworld", "shapeworld_strict"),
    "shapeworld_partial": _lazy_function("shapeworld", "shapeworld_partial"),
    "shapeworld_answer": _lazy_function("shapeworld", "shapeworld_answer"),
}


def _import_path(spec: str) -> Any:
    module_name, sep, attr = spec.partition(":")
    if not sep:
        module_name, _, attr = spec.rpartition(".")
    if not module_name or not attr:
        raise ValueError(
            f"{spec!r} is not an import path; use 'package.module:function' or 'package.module.function'"
        )
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise ValueError(f"cannot import module {module_name!r} for reward {spec!r}: {error}") from error
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ValueError(f"module {module_name!r} has no attribute {attr!r} (reward {spec!r})")
        obj = getattr(obj, part)
    return obj


def get_reward_function(spec: str, **kwargs: Any) -> RewardFunc:
    """Resolve a reward: a registry name (built with ``kwargs``) or an import path to a reward function
    (``"pkg.module:func"`` / ``"pkg.module.func"``; with ``kwargs`` the object is called as a factory)."""
    if not isinstance(spec, str) or not spec:
        raise ValueError(f"a reward is named by a non-empty string, got {spec!r}")
    if spec in REWARD_REGISTRY:
        return REWARD_REGISTRY[spec](**kwargs)
    if ":" not in spec and "." not in spec:
        raise ValueError(
            f"unknown reward {spec!r}; known rewards: {sorted(REWARD_REGISTRY)}, "
            "or give an import path like 'my_package.rewards:my_reward'"
        )
    obj = _import_path(spec)
    if kwargs:
        obj = obj(**kwargs)
    if not callable(obj):
        raise ValueError(f"reward {spec!r} resolved to a non-callable {type(obj).__name__}")
    return obj


def __getattr__(name: str) -> Any:
    # The checked_reward wrapper is light (no models), but importing it pulls in TRL; keep it lazy too.
    if name == "checked_reward":
        from .combine import checked_reward

        return checked_reward
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["REWARD_REGISTRY", "RewardFunc", "checked_reward", "get_reward_function"]
