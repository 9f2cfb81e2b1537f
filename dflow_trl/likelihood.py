"""Estimators of the per-step policy ``log π_θ(x_{k+1} | x_k)``, one interface.

Every estimator maps a recorded step (:class:`~dflow_trl.sampling.StepRecord`) and fresh
posterior log-probabilities ``log p^θ_{1|t}`` (``(B, D, V)``, with grad) to per-position
``log π̂_θ`` (``(B, D)``). Evaluated at θ_old each returns the rollout's own ``old_log_prob``, so
``exp(log π̂_θ - log π̂_old)`` is the policy ratio GRPO clips.

* ``exact``: ``log Σ_{x1} p^θ(x1) K_h(x → y | x1)`` by the path (closed form for mixture paths).
* ``monte_carlo`` (the paper's importance sampling): with ``n`` stored draws ``X_j ~ p^{old}``,
  ``π̂_θ = f δ_x(y) + (1/n) Σ_j p^θ(X_j)/p^{old}(X_j) · (K_h(x → y | X_j) - f δ_x(y))``; for
  ``f = 0`` the ratio is ``Σ_j w_j p^θ(X_j)/p^{old}(X_j)`` with ``w_j = K_j / Σ_j' K_j'``.
* ``top_k``: the ``k`` most probable ``x1`` under ``p^{old}`` summed exactly, the remaining mass
  by the draws that fall outside them — deterministic when the tail is empty, equal to
  ``exact`` when ``k = V``, to ``monte_carlo`` when ``k = 0``.
* ``posterior_only`` (diffu-GRPO/d1): ``log p^θ_{1|0}(x_K | x_0)`` — the final sample's posterior
  at the source state, no rates.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch

from .paths.base import ProbabilityPath
from .sampling import StepRecord, estimate_log_prob

ESTIMATORS = ("monte_carlo", "top_k", "exact", "posterior_only")


class Estimator(ABC):
    """Per-position ``log π̂_θ(x_{k+1} | x_k)`` from a recorded step and fresh log-posteriors."""

    name: str
    num_draws: int = 0  # what the sampler must record
    head_size: int = 0

    def check_path(self, path: ProbabilityPath) -> None:  # noqa: B027 - optional hook
        """Raise ``ValueError`` if this estimator cannot be used with ``path``."""

    @abstractmethod
    def step_log_prob(
        self, path: ProbabilityPath, record: StepRecord, log_post: torch.Tensor, t: float, h: float
    ) -> torch.Tensor:
        """``(B, D)`` estimate of ``log π_θ(x_next | x_t)``; ``log_post`` is ``(B, D, V)``."""


class ExactEstimator(Estimator):
    name = "exact"

    def check_path(self, path: ProbabilityPath) -> None:
        if not path.exact_is_cheap:
            raise ValueError(
                f"estimator 'exact' sums over all V={path.vocab_size} values of x1 with a V-sized rate per "
                f"value ({type(path).__name__}); that is too costly for full canvases. Use 'monte_carlo' or "
                "'top_k' (or a mixture path, whose exact sum is closed-form)."
            )

    def step_log_prob(self, path, record, log_post, t, h):
        return path.step_log_prob(log_post.exp(), record.x_t, record.x_next, t, h)


class MonteCarloEstimator(Estimator):
    """Importance sampling over ``num_draws`` stored posterior draws (paper default n = 24)."""

    name = "monte_carlo"

    def __init__(self, num_draws: int = 24) -> None:
        if int(num_draws) < 1:
            raise ValueError(f"monte_carlo needs num_draws >= 1, got {num_draws}")
        self.num_draws = int(num_draws)

    def step_log_prob(self, path, record, log_post, t, h):
        return _from_record(record, log_post)


class TopKEstimator(Estimator):
    """Exact over the ``k`` most probable ``x1`` (under the rollout posterior) + importance-sampled tail."""

    name = "top_k"

    def __init__(self, k: int = 16, num_draws: int = 8) -> None:
        if int(k) < 1:
            raise ValueError(f"top_k needs k >= 1, got {k}")
        if int(num_draws) < 0:
            raise ValueError(f"num_draws must be >= 0, got {num_draws}")
        self.head_size, self.num_draws = int(k), int(num_draws)

    def check_path(self, path: ProbabilityPath) -> None:
        if self.head_size > path.vocab_size:
            raise ValueError(
                f"top_k_size={self.head_size} is larger than the canvas vocabulary V={path.vocab_size}: "
                f"use top_k_size <= {path.vocab_size} (top_k_size = V is the exact sum)"
            )
        if self.head_size < path.vocab_size and self.num_draws == 0:
            raise ValueError(
                f"top_k with k={self.head_size} < V={path.vocab_size} needs num_draws >= 1 to cover the tail"
            )

    def step_log_prob(self, path, record, log_post, t, h):
        return _from_record(record, log_post)


class PosteriorOnlyEstimator(Estimator):
    """diffu-GRPO/d1 baseline: scored once, at the source, on the final sample."""

    name = "posterior_only"

    def step_log_prob(self, path, record, log_post, t, h):
        return log_post.gather(-1, record.x_next.unsqueeze(-1)).squeeze(-1)


def _from_record(record: StepRecord, log_post: torch.Tensor) -> torch.Tensor:
    head = log_post.gather(-1, record.head_ids)
    ratio = log_post.gather(-1, record.draw_ids) - record.draw_logp_old.to(log_post.dtype)
    return estimate_log_prob(record.log_floor, head, record.head_log_excess, ratio, record.draw_log_excess)


def get_estimator(name: str, num_draws: int = 24, top_k: int = 16) -> Estimator:
    """Build an estimator by name: one of ``monte_carlo``, ``top_k``, ``exact``, ``posterior_only``."""
    if name == "monte_carlo":
        return MonteCarloEstimator(num_draws)
    if name == "top_k":
        return TopKEstimator(top_k, num_draws)
    if name == "exact":
        return ExactEstimator()
    if name == "posterior_only":
        return PosteriorOnlyEstimator()
    raise ValueError(f"unknown estimator {name!r}; choose one of {', '.join(ESTIMATORS)}")
