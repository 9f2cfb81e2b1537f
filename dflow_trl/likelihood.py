"""Estimators of the per-step policy ``log π_θ(x_{k+1} | x_k)``: the one home of what a rollout
records for them and how they score a recorded step.

An estimator draws each rollout step and records it (:meth:`Estimator.record`, a
:class:`StepRecord`), says which steps the loss scores and at which state and time
(:meth:`Estimator.scored_steps`, :meth:`Estimator.scored_record`), and maps a recorded step and
fresh posterior log-probabilities ``log p^θ_{1|t}`` (``(B, D, V)``, with grad) to per-position
``log π̂_θ`` (``(B, D)``, :meth:`Estimator.step_log_prob`). Evaluated at θ_old each returns the
rollout's own ``old_log_prob``, so ``exp(log π̂_θ - log π̂_old)`` is the policy ratio GRPO clips.

* ``exact``: ``log Σ_{x1} p^θ(x1) K_h(x → y | x1)`` by the path (closed form for mixture paths).
* ``monte_carlo`` (the paper's importance sampling): with ``n`` stored draws ``X_j ~ p^{old}``,
  ``π̂_θ = f δ_x(y) + (1/n) Σ_j p^θ(X_j)/p^{old}(X_j) · (K_h(x → y | X_j) - f δ_x(y))``; for
  ``f = 0`` the ratio is ``Σ_j w_j p^θ(X_j)/p^{old}(X_j)`` with ``w_j = K_j / Σ_j' K_j'``.
* ``top_k``: the ``k`` most probable ``x1`` under ``p^{old}`` summed exactly, the remaining mass
  by the draws that fall outside them — deterministic when the tail is empty, equal to
  ``exact`` when ``k = V``, to ``monte_carlo`` when ``k = 0``.
* ``posterior_only`` (diffu-GRPO/d1): ``log p^θ_{1|0}(x_K | x_0)`` — the final sample's posterior
  at the source state, no rates.

For the sampled estimators a step also records, per canvas position,

* a θ-independent *head* set ``S`` (the k most probable ``x1`` under the rollout posterior) with
  ``log(K_h(x → y | s) - f δ_x(y))`` for each ``s ∈ S``;
* ``n`` *draws* ``X_j ~ p^{old}_{1|t}`` with ``log p^{old}(X_j)`` and ``log(K_h(x → y | X_j) - f δ_x(y))``
  (``-inf`` for draws inside ``S``);
* ``log(f δ_x(y))`` with ``f`` the path's stay floor (:meth:`ProbabilityPath.stay_floor`).

The draws are *coupled* to the move: unless the step stayed through the floor or its ``x1`` lies
in ``S``, the ``x1`` that moved the token sits in a uniformly chosen draw slot, the other draws
being fresh. Then the joint law of ``(draws, y)`` is exactly the ``θ = θ_old`` member of the
extended policy the estimator's ratio is taken in, whose ``y``-marginal is ``π_θ`` for every θ
(docs/method.md derives this). It also guarantees the realised ``y`` has non-zero estimated
probability, and reduces the masked mixture path to the plain posterior ratio of unmasked tokens.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Protocol

import torch

from .paths.base import ProbabilityPath


@dataclass
class StepRecord:
    """One recorded step ``x_t → x_next`` (all tensors lead with the batch dims of ``x_t``)."""

    x_t: torch.LongTensor
    x_next: torch.LongTensor
    log_floor: torch.Tensor  # (...,)   log(f δ_x(y))
    head_ids: torch.LongTensor  # (..., k)
    head_log_excess: torch.Tensor  # (..., k)
    draw_ids: torch.LongTensor  # (..., n)
    draw_logp_old: torch.Tensor  # (..., n)
    draw_log_excess: torch.Tensor  # (..., n)
    old_log_prob: torch.Tensor  # (...,)   the estimator's log π̂_old(y | x)


def _log_excess(
    path: ProbabilityPath,
    x: torch.Tensor,
    y: torch.Tensor,
    cand: torch.Tensor,
    t: float,
    h: float,
    floor: torch.Tensor,
) -> torch.Tensor:
    """``log(K_h(x → y | cand) - f δ_x(y))`` for candidates ``cand`` of shape ``(..., m)``."""
    if cand.shape[-1] == 0:
        return torch.zeros(cand.shape, dtype=torch.float64, device=cand.device)
    lk = path.kernel_log_prob(x.unsqueeze(-1), y.unsqueeze(-1), cand, t, h).double()
    stay_floor = (floor * (x == y)).unsqueeze(-1)
    if not bool((stay_floor > 0).any()):
        return lk
    return (lk.exp() - stay_floor).clamp_min(0).log()


def estimate_log_prob(
    log_floor: torch.Tensor,
    head_log_post: torch.Tensor,
    head_log_excess: torch.Tensor,
    draw_log_ratio: torch.Tensor,
    draw_log_excess: torch.Tensor,
) -> torch.Tensor:
    """``log π̂ = log( f δ_x(y) + Σ_{s∈S} p(s)(K_s - f δ)
    + (1/n) Σ_{j∉S} p(X_j)/p^{old}(X_j) (K_j - f δ) )``."""
    n = draw_log_excess.shape[-1]
    parts = [
        log_floor.unsqueeze(-1).to(head_log_post.dtype),
        head_log_post + head_log_excess.to(head_log_post.dtype),
    ]
    if n:
        parts.append(draw_log_ratio + draw_log_excess.to(draw_log_ratio.dtype) - math.log(n))
    return torch.logsumexp(torch.cat(parts, dim=-1), dim=-1)


def _inverse_cdf(probs: torch.Tensor, u: torch.Tensor) -> torch.LongTensor:
    """The index ``j`` with ``F(j − 1) ≤ u · F(V − 1) < F(j)`` for ``F`` the running sum of ``probs``."""
    cdf = probs.double().cumsum(-1)
    target = (u.double() * cdf[..., -1]).unsqueeze(-1)
    return torch.searchsorted(cdf, target, right=True).squeeze(-1).clamp_max(probs.shape[-1] - 1)


def _draw_with_noise(
    path: ProbabilityPath, posterior_probs: torch.Tensor, x_t: torch.LongTensor, t: float, h: float,
    noise: torch.Tensor,
) -> tuple[torch.LongTensor, torch.LongTensor]:
    """``x1 ~ p`` and ``x_next ~ K_h(x_t → · | x1)``, each position from its own two uniforms."""
    if tuple(noise.shape) != (2, *x_t.shape):
        raise ValueError(f"noise must have shape {(2, *x_t.shape)}, got {tuple(noise.shape)}")
    x1 = _inverse_cdf(posterior_probs, noise[0])
    targets = torch.arange(path.vocab_size, device=x_t.device)
    kernel = path.kernel_log_prob(x_t.unsqueeze(-1), targets, x1.unsqueeze(-1), t, h).double().exp()
    return x1, _inverse_cdf(kernel, noise[1])


def record_step(
    path: ProbabilityPath,
    posterior_probs: torch.Tensor,
    x_t: torch.LongTensor,
    t: float,
    h: float,
    generator: torch.Generator | None = None,
    num_draws: int = 0,
    head_size: int = 0,
    noise: torch.Tensor | None = None,
) -> StepRecord:
    """Draw ``x_next`` from ``π(· | x_t)`` and record what the estimators need (see module doc).

    ``noise`` (``(2, *x_t.shape)`` uniforms in [0, 1)) draws ``x1`` and ``x_next`` position by position
    by inverting their CDFs, so two calls with the same noise agree wherever their inputs do (common
    random numbers, :mod:`dflow_trl.credit`); the kernel row then costs ``O(V)`` per position."""
    path.check_posterior(posterior_probs)
    path.check_tokens(x_t, "x_t")
    vocab = path.vocab_size
    if posterior_probs.shape[:-1] != x_t.shape:
        raise ValueError(
            f"posterior shape {tuple(posterior_probs.shape)} does not match x_t {tuple(x_t.shape)} + (V,)"
        )
    head_size = min(int(head_size), vocab)
    if num_draws < 0 or head_size < 0:
        raise ValueError("num_draws and head_size must be >= 0")
    if 0 < head_size < vocab and num_draws == 0:
        raise ValueError("a head smaller than the vocabulary needs num_draws >= 1 for the tail")
    flat = posterior_probs.detach().reshape(-1, vocab).float()
    if noise is None:
        x1 = torch.multinomial(flat, 1, generator=generator).view(x_t.shape)
        y = path.sample_kernel(x_t, x1, t, h, generator=generator)
    else:
        x1, y = _draw_with_noise(path, posterior_probs.detach(), x_t, t, h, noise)

    floor = path.stay_floor(x_t, t, h).double()
    log_floor = (floor * (y == x_t)).log()
    stayed_by_floor = torch.zeros_like(y, dtype=torch.bool)
    if bool((floor > 0).any()):
        k_stay = path.kernel_log_prob(x_t, x_t, x1, t, h).double().exp()
        u = torch.rand(x_t.shape, generator=generator, dtype=torch.float64, device=x_t.device)
        stayed_by_floor = (y == x_t) & (u * k_stay < floor)

    def log_post(ids: torch.Tensor) -> torch.Tensor:  # only the k + n entries asked for, not (..., V)
        return posterior_probs.detach().gather(-1, ids).double().clamp_min(0).log()

    head_ids = torch.zeros((*x_t.shape, 0), dtype=torch.long, device=x_t.device)
    if head_size:
        head_ids = torch.topk(posterior_probs.detach(), head_size, dim=-1).indices
    in_head = (head_ids == x1.unsqueeze(-1)).any(-1)

    draw_ids = torch.zeros((*x_t.shape, 0), dtype=torch.long, device=x_t.device)
    if num_draws:
        draw_ids = torch.multinomial(flat, num_draws, replacement=True, generator=generator).view(
            *x_t.shape, num_draws
        )
        place = ~stayed_by_floor & ~in_head
        slot = torch.randint(0, num_draws, x_t.shape, generator=generator, device=x_t.device)
        placed = draw_ids.gather(-1, slot.unsqueeze(-1)).squeeze(-1)
        draw_ids = draw_ids.scatter(-1, slot.unsqueeze(-1), torch.where(place, x1, placed).unsqueeze(-1))

    # Head and draws in one call: the metric path's rates then cost one pass per distinct x1.
    log_excess = _log_excess(path, x_t, y, torch.cat([head_ids, draw_ids], -1), t, h, floor)
    head_log_excess, draw_log_excess = log_excess.split([head_ids.shape[-1], draw_ids.shape[-1]], -1)
    if head_size and num_draws:
        in_head_draw = (draw_ids.unsqueeze(-1) == head_ids.unsqueeze(-2)).any(-1)
        draw_log_excess = draw_log_excess.masked_fill(in_head_draw, -math.inf)
    draw_logp_old = log_post(draw_ids)
    if head_size or num_draws:
        old = estimate_log_prob(
            log_floor,
            log_post(head_ids),
            head_log_excess,
            torch.zeros_like(draw_logp_old),
            draw_log_excess,
        )
    elif path.exact_is_cheap:  # nothing recorded: the exact estimator scores the step
        old = path.step_log_prob(posterior_probs.detach(), x_t, y, t, h)
    else:
        old = torch.full(x_t.shape, math.nan, device=x_t.device)
    return StepRecord(
        x_t=x_t,
        x_next=y,
        log_floor=log_floor.float(),
        head_ids=head_ids,
        head_log_excess=head_log_excess.float(),
        draw_ids=draw_ids,
        draw_logp_old=draw_logp_old.float(),
        draw_log_excess=draw_log_excess.float(),
        old_log_prob=old.float(),
    )


PER_STEP_FIELDS = (
    "log_floor",
    "head_ids",
    "head_log_excess",
    "draw_ids",
    "draw_logp_old",
    "draw_log_excess",
    "old_log_prob",
)


class RecordedSteps(Protocol):
    """What an estimator reads from a batch of recorded rollouts (a
    :class:`~dflow_trl.sampling.Trajectory`): the states ``(B, K+1, D)`` and each step's record."""

    states: torch.LongTensor

    def step(self, k: int) -> StepRecord: ...


class Estimator(ABC):
    """Per-position ``log π̂_θ(x_{k+1} | x_k)`` from a recorded step and fresh log-posteriors.

    ``per_step``: the estimator scores every trained step (False for ``posterior_only``, which
    scores the final sample once), so step-level credit (branching, step baselines) applies."""

    name: str
    num_draws: int = 0  # what the rollout records
    head_size: int = 0
    per_step: bool = True

    def check_path(self, path: ProbabilityPath) -> None:  # noqa: B027 - optional hook
        """Raise ``ValueError`` if this estimator cannot be used with ``path``."""

    def record(
        self,
        path: ProbabilityPath,
        posterior_probs: torch.Tensor,
        x_t: torch.LongTensor,
        t: float,
        h: float,
        generator: torch.Generator | None = None,
        noise: torch.Tensor | None = None,
    ) -> StepRecord:
        """Draw the rollout step ``x_t → x_next`` and record what :meth:`step_log_prob` needs
        (``noise``: :func:`record_step`)."""
        return record_step(
            path, posterior_probs, x_t, t, h, generator, self.num_draws, self.head_size, noise
        )

    def scored_steps(self, trainable: list[int]) -> list[int]:
        """The steps whose log-probability the loss takes, given the config's ``trainable`` ones."""
        return trainable

    def scored_record(self, trajectory: RecordedSteps, k: int) -> tuple[StepRecord, float | None]:
        """The record of step ``k`` of ``trajectory`` that :meth:`step_log_prob` scores, and the time
        at which the posterior is evaluated (``None``: the step's own ``t_k``)."""
        return trajectory.step(k), None

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
    """diffu-GRPO/d1 baseline (biased): ``log p^θ_{1|0}(x_K | x_0)``, scored once, at the source, on
    the final sample; the rollout records nothing for it."""

    name = "posterior_only"
    per_step = False

    def scored_steps(self, trainable: list[int]) -> list[int]:
        return [0]

    def scored_record(self, trajectory, k):
        states = trajectory.states
        empty = torch.zeros(states.shape[0], states.shape[-1], 0, device=states.device)
        source_to_final = StepRecord(
            states[:, 0], states[:, -1], None, empty.long(), empty, empty.long(), empty, empty, None
        )
        return source_to_final, 0.0

    def step_log_prob(self, path, record, log_post, t, h):
        return log_post.gather(-1, record.x_next.unsqueeze(-1)).squeeze(-1)


def _from_record(record: StepRecord, log_post: torch.Tensor) -> torch.Tensor:
    head = log_post.gather(-1, record.head_ids)
    ratio = log_post.gather(-1, record.draw_ids) - record.draw_logp_old.to(log_post.dtype)
    return estimate_log_prob(record.log_floor, head, record.head_log_excess, ratio, record.draw_log_excess)


ESTIMATOR_CLASSES: dict[str, type[Estimator]] = {
    cls.name: cls for cls in (MonteCarloEstimator, TopKEstimator, ExactEstimator, PosteriorOnlyEstimator)
}
ESTIMATORS = tuple(ESTIMATOR_CLASSES)


def get_estimator(name: str, num_draws: int = 24, top_k: int = 16) -> Estimator:
    """Build an estimator by name (one of :data:`ESTIMATORS`); ``num_draws`` are the posterior draws
    of ``monte_carlo`` and the tail draws of ``top_k``, ``top_k`` its exact head size."""
    if name not in ESTIMATOR_CLASSES:
        raise ValueError(f"unknown estimator {name!r}; choose one of {', '.join(ESTIMATORS)}")
    if name == "monte_carlo":
        return MonteCarloEstimator(num_draws)
    if name == "top_k":
        return TopKEstimator(top_k, num_draws)
    return ESTIMATOR_CLASSES[name]()
