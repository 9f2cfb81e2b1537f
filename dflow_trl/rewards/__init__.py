"""Reward functions for dflow-trl, in TRL's signature ``f(prompts, completions, completion_ids, **columns)``.

``get_reward_function("pickscore")`` builds a reward by registry name; heavy modules and models load only
when a reward is asked for (models on its first call).

The registry is open. In Python, ``register_reward(name, factory)`` adds a name. An installed package adds
names without being imported by declaring entry points in the group ``dflow_trl.rewards``
(``ENTRY_POINT_GROUP``), each naming a reward function or a reward class::

    [project.entry-points."dflow_trl.rewards"]
    shapeworld_partial = "dflow_trl.tasks.shapeworld.rewards:shapeworld_partial"

``REWARD_REGISTRY`` lists these names beside the built-in ones (so an unknown name's error lists them too);
an entry point's module is imported only when its reward is asked for. A function target is the reward
itself (keyword options are bound with ``functools.partial``, keeping its ``__name__``); a class target
is a factory (options go to its
constructor, its instance is the reward). This is how the tasks in ``dflow_trl.tasks`` register their
rewards: the core never imports a task.
"""

from __future__ import annotations

import functools
import importlib
import inspect
from collections.abc import Callable, Iterator, MutableMapping
from importlib.metadata import EntryPoint, entry_points
from typing import Any

RewardFunc = Callable[..., list[float | None]]


def _lazy(module: str, attr: str) -> Callable[..., RewardFunc]:
    """A factory that imports ``dflow_trl.rewards.<module>`` only when called."""

    def factory(**kwargs: Any) -> RewardFunc:
        return getattr(importlib.import_module(f"{__name__}.{module}"), attr)(**kwargs)

    factory.__name__ = attr
    factory.__doc__ = f"Build the reward ``{module}.{attr}`` (imported on first use)."
    return factory


def _bind(func: RewardFunc, name: str, kwargs: dict[str, Any]) -> RewardFunc:
    """``func`` itself, or with ``kwargs`` bound by a partial that keeps the name TRL logs it under."""
    if not kwargs:
        return func
    bound = functools.partial(func, **kwargs)
    bound.__name__ = getattr(func, "__name__", name)  # type: ignore[attr-defined]
    return bound


ENTRY_POINT_GROUP = "dflow_trl.rewards"


def _entry_point_factory(ep: EntryPoint) -> Callable[..., RewardFunc]:
    """A factory that imports an entry point's target only when called: a class is built with the
    options, a function is the reward (options bound by a partial)."""

    def factory(**kwargs: Any) -> RewardFunc:
        try:
            target = ep.load()
        except (ImportError, AttributeError) as error:
            raise ImportError(
                f"reward {ep.name!r} needs {ep.value} (entry point of group {ENTRY_POINT_GROUP!r}), "
                f"which is unavailable: {error}"
            ) from error
        if inspect.isclass(target):
            return target(**kwargs)
        if not callable(target):
            kind = type(target).__name__
            raise ValueError(f"entry point {ep.name!r} = {ep.value!r} is a {kind}, not a reward")
        return _bind(target, ep.name, kwargs)

    factory.__name__ = ep.name
    factory.__doc__ = f"Build the reward ``{ep.value}`` (entry point, imported on first use)."
    return factory


class RewardRegistry(MutableMapping[str, Callable[..., RewardFunc]]):
    """Reward name → factory (``factory(**kwargs)`` builds the reward).

    Holds the built-in names and those added with :func:`register_reward` (or item assignment), and
    lists the entry points that installed packages declare in ``ENTRY_POINT_GROUP``. The package
    metadata is read once, on the first lookup of a name that is not registered (or the first
    listing); an entry point's module is imported only when its factory is called. A registered name
    shadows an entry point of the same name. ``refresh()`` re-reads the metadata (after installing a
    package into a running interpreter).
    """

    def __init__(self, factories: dict[str, Callable[..., RewardFunc]]) -> None:
        self._factories = dict(factories)
        self._entry_points: dict[str, EntryPoint] | None = None

    def installed(self) -> dict[str, EntryPoint]:
        """The installed entry points by name (the first of a duplicated name wins)."""
        if self._entry_points is None:
            found: dict[str, EntryPoint] = {}
            for ep in entry_points(group=ENTRY_POINT_GROUP):
                found.setdefault(ep.name, ep)
            self._entry_points = found
        return self._entry_points

    def refresh(self) -> None:
        self._entry_points = None

    def __getitem__(self, name: str) -> Callable[..., RewardFunc]:
        if name in self._factories:
            return self._factories[name]
        ep = self.installed().get(name)
        if ep is None:
            raise KeyError(name)
        return _entry_point_factory(ep)

    def __contains__(self, name: object) -> bool:
        return name in self._factories or name in self.installed()

    def __iter__(self) -> Iterator[str]:
        yield from self._factories
        yield from (name for name in self.installed() if name not in self._factories)

    def __len__(self) -> int:
        return len(self._factories.keys() | self.installed().keys())

    def __setitem__(self, name: str, factory: Callable[..., RewardFunc]) -> None:
        self._factories[name] = factory

    def __delitem__(self, name: str) -> None:
        # Only registered names can go; an entry point stays listed while its package is installed.
        del self._factories[name]

    def __repr__(self) -> str:
        return f"RewardRegistry({sorted(self)})"


REWARD_REGISTRY = RewardRegistry(
    {
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
        "placebo": _lazy("placebo", "PlaceboReward"),
    }
)


def register_reward(name: str, factory: Callable[..., RewardFunc], *, overwrite: bool = False) -> None:
    """Add ``name`` to ``REWARD_REGISTRY``: ``factory(**kwargs)`` builds the reward that
    ``get_reward_function(name, **kwargs)`` returns. A taken name (an entry point's included) raises
    unless ``overwrite``; a registered name shadows an entry point of the same name."""
    if not isinstance(name, str) or not name or ":" in name or "." in name:
        raise ValueError(f"a reward name is a non-empty string without ':' or '.', got {name!r}")
    if not callable(factory):
        raise ValueError(f"the factory of reward {name!r} must be callable, got {type(factory).__name__}")
    if name in REWARD_REGISTRY and not overwrite:
        raise ValueError(f"reward {name!r} is already registered; pass overwrite=True to replace it")
    REWARD_REGISTRY[name] = factory


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
    """Resolve a reward: a registry name (built with ``kwargs``), a name from an installed package's
    ``dflow_trl.rewards`` entry points, or an import path to a reward function (``"pkg.module:func"`` /
    ``"pkg.module.func"``; with ``kwargs`` the object is called as a factory)."""
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


__all__ = [
    "ENTRY_POINT_GROUP",
    "REWARD_REGISTRY",
    "RewardFunc",
    "RewardRegistry",
    "checked_reward",
    "get_reward_function",
    "register_reward",
]
