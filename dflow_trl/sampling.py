"""Euler-jump sampling of discrete flow models: one kernel, two uses.

Each step draws ``x1 ~ p_{1|t}(· | x_t)`` and then ``x_{t+h} ~ K_h(x_t → · | x1)`` — exactly the
distribution ``π(y | x) = Σ_{x1} p(x1) K_h(x → y | x1)`` that :mod:`dflow_trl.likelihood` scores.

For the estimators of ``log π_θ`` the step also records, per canvas position,

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
from collections.abc import Callable
from dataclasses import dataclass, fields

import torch

from .paths.base import ProbabilityPath

LogitsFn = Callable[[torch.LongTensor, float], torch.Tensor]


def guided_log_probs(
    cond_logits: torch.Tensor,
    uncond_logits: torch.Tensor | None = None,
    cfg_scale: float = 0.0,
    temperature: float = 1.0,
) -> torch.Tensor:
    """Log posterior of the rollout policy: ``log softmax(((1 + w) ℓ_c - w ℓ_u) / τ)``."""
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    logits = cond_logits
    if cfg_scale != 0:
        if uncond_logits is None:
            raise ValueError("cfg_scale != 0 needs unconditional logits")
        guided = (1 + cfg_scale) * cond_logits - cfg_scale * uncond_logits
        # A token the model rules out (-inf, e.g. the mask token of a masked path) stays ruled out;
        # (1 + w)(-inf) - w(-inf) would be NaN.
        logits = torch.where(torch.isneginf(cond_logits), cond_logits, guided)
    return torch.log_softmax(logits.float() / temperature, dim=-1)


def time_grid(num_steps: int, device: torch.device | str | None = None, power: float = 1.0) -> torch.Tensor:
    """Grid ``t_k = (k / K)^power``, ``k = 0..K``: uniform for ``power = 1`` (FUDOKI's); ``power > 1``
    takes smaller steps near ``t = 0``, where a uniform-source canvas is still mostly noise."""
    if int(num_steps) < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    if not float(power) > 0:
        raise ValueError(f"the time grid's power must be > 0, got {power}")
    return torch.linspace(0, 1, int(num_steps) + 1, dtype=torch.float64, device=device) ** float(power)


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


def sample_step_recorded(
    path: ProbabilityPath,
    posterior_probs: torch.Tensor,
    x_t: torch.LongTensor,
    t: float,
    h: float,
    generator: torch.Generator | None = None,
    num_draws: int = 0,
    head_size: int = 0,
) -> StepRecord:
    """Draw ``x_next`` from ``π(· | x_t)`` and record what the estimators need (see module doc)."""
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
    x1 = torch.multinomial(flat, 1, generator=generator).view(x_t.shape)
    y = path.sample_kernel(x_t, x1, t, h, generator=generator)

    floor = path.stay_floor(x_t, t, h).double()
    log_floor = (floor * (y == x_t)).log()
    stayed_by_floor = torch.zeros_like(y, dtype=torch.bool)
    if bool((floor > 0).any()):
        k_stay = path.kernel_log_prob(x_t, x_t, x1, t, h).double().exp()
        u = torch.rand(x_t.shape, generator=generator, dtype=torch.float64, device=x_t.device)
        stayed_by_floor = (y == x_t) & (u * k_stay < floor)

    log_post = posterior_probs.detach().double().clamp_min(0).log()
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

    head_log_excess = _log_excess(path, x_t, y, head_ids, t, h, floor)
    draw_log_excess = _log_excess(path, x_t, y, draw_ids, t, h, floor)
    if head_size and num_draws:
        in_head_draw = (draw_ids.unsqueeze(-1) == head_ids.unsqueeze(-2)).any(-1)
        draw_log_excess = draw_log_excess.masked_fill(in_head_draw, -math.inf)
    draw_logp_old = log_post.gather(-1, draw_ids)
    if head_size or num_draws:
        old = estimate_log_prob(
            log_floor,
            log_post.gather(-1, head_ids),
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


def sample_step(
    path: ProbabilityPath,
    posterior_probs: torch.Tensor,
    x_t: torch.LongTensor,
    t: float,
    h: float,
    generator: torch.Generator | None = None,
) -> torch.LongTensor:
    """Draw ``x1 ~ posterior`` then ``x_next ~ K_h(x_t → · | x1)``, elementwise."""
    path.check_posterior(posterior_probs)
    path.check_tokens(x_t, "x_t")
    x1 = torch.multinomial(
        posterior_probs.detach().reshape(-1, path.vocab_size).float(), 1, generator=generator
    )
    return path.sample_kernel(x_t, x1.view(x_t.shape), t, h, generator=generator)


_PER_STEP = (
    "log_floor", "head_ids", "head_log_excess", "draw_ids", "draw_logp_old", "draw_log_excess", "old_log_prob"
)


@dataclass
class Trajectory:
    """A batch of rollouts: canvas states ``x_0..x_K`` and per-step estimator records.

    ``states`` is ``(B, K+1, D)``; ``times`` ``(K+1,)``; per-step fields are ``(B, K, D, ...)``.
    ``greedy`` (``(B, K, D)``, when recorded) is ``argmax p^θ_{1|t}(· | x_k)`` per step: the canvas
    the posterior at ``x_k`` predicts, a function of ``x_k`` alone (a valid baseline for step k).
    ``entropy`` (``(B, K)``, when recorded) is the posterior's entropy per step, averaged over the
    canvas."""

    states: torch.LongTensor
    times: torch.Tensor
    log_floor: torch.Tensor
    head_ids: torch.LongTensor
    head_log_excess: torch.Tensor
    draw_ids: torch.LongTensor
    draw_logp_old: torch.Tensor
    draw_log_excess: torch.Tensor
    old_log_prob: torch.Tensor
    greedy: torch.LongTensor | None = None
    entropy: torch.Tensor | None = None

    @property
    def num_steps(self) -> int:
        return self.states.shape[1] - 1

    @property
    def final(self) -> torch.LongTensor:
        return self.states[:, -1]

    def step(self, k: int) -> StepRecord:
        """The record of step ``k`` (``t_k → t_{k+1}``)."""
        per_step = {name: getattr(self, name)[:, k] for name in _PER_STEP}
        return StepRecord(x_t=self.states[:, k], x_next=self.states[:, k + 1], **per_step)

    def to_dict(self, prefix: str = "flow_") -> dict[str, torch.Tensor]:
        """Batch-first tensors (times repeated per sample) for TRL's buffering/splitting."""
        out = {prefix + f.name: getattr(self, f.name) for f in fields(self) if f.name != "times"}
        for name in ("greedy", "entropy"):
            if getattr(self, name) is None:
                del out[prefix + name]
        out[prefix + "times"] = self.times.unsqueeze(0).expand(self.states.shape[0], -1)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, torch.Tensor], prefix: str = "flow_") -> Trajectory:
        values = {f.name: data[prefix + f.name] for f in fields(cls) if prefix + f.name in data}
        values["times"] = values["times"][0]
        return cls(**values)


def _branch_leaders(
    batch: int, branch_steps: torch.LongTensor | None, group_size: int, device: torch.device
) -> Callable[[int], torch.LongTensor] | None:
    """``rows(k)``: for each row, the row whose step ``k - 1`` it takes (its group's first row while
    ``k <= branch_steps``, itself after), or None without branching."""
    if branch_steps is None:
        return None
    if group_size < 1 or batch % group_size:
        raise ValueError(f"branching needs whole groups: {batch} rows in groups of {group_size}")
    steps = torch.as_tensor(branch_steps, device=device).long()
    if steps.shape != (batch,):
        raise ValueError(f"branch_steps must hold one step per row ({batch},), got {tuple(steps.shape)}")
    first = torch.arange(batch, device=device) // group_size * group_size
    if not bool((steps == steps[first]).all()):
        raise ValueError("every row of a group must branch at the same step")
    own = torch.arange(batch, device=device)
    return lambda k: torch.where(k <= steps, first, own)


@torch.no_grad()
def sample_trajectory(
    path: ProbabilityPath,
    logits_fn: LogitsFn,
    x0: torch.LongTensor,
    num_steps: int | None = None,
    times: torch.Tensor | None = None,
    uncond_logits_fn: LogitsFn | None = None,
    cfg_scale: float = 0.0,
    temperature: float = 1.0,
    num_draws: int = 0,
    head_size: int = 0,
    generator: torch.Generator | None = None,
    branch_steps: torch.LongTensor | None = None,
    group_size: int = 1,
    record_greedy: bool = False,
    record_entropy: bool = False,
) -> Trajectory:
    """Roll ``x0`` (``(B, D)``) from ``t = 0`` to ``t = 1`` with the Euler-jump sampler.

    ``logits_fn(x_t, t)`` returns ``(B, D, V)`` posterior logits for the canvas; with ``cfg_scale``
    ``w ≠ 0`` the posterior is ``softmax(((1 + w) ℓ_c - w ℓ_u) / τ)``. The last step takes ``x1``.

    ``branch_steps`` (``(B,)``) makes groups of ``group_size`` consecutive rows share one
    trajectory ``x_0 .. x_k`` (their first row's) and branch at step ``k = branch_steps[row]``:
    from ``x_k`` on each row draws independently, so the rows are i.i.d. given ``x_k`` and their
    mean reward is an unbiased value of ``x_k`` (step-level credit).

    ``record_greedy`` also keeps each step's posterior argmax (``Trajectory.greedy``),
    ``record_entropy`` its mean entropy over the canvas (``Trajectory.entropy``).
    """
    if times is None:
        times = time_grid(num_steps if num_steps is not None else 8, device=x0.device)
    times = torch.as_tensor(times, dtype=torch.float64, device=x0.device)
    if times.ndim != 1 or times.numel() < 2 or float(times[0]) != 0.0 or abs(float(times[-1]) - 1.0) > 1e-9:
        raise ValueError("times must be an increasing 1-D grid from 0 to 1")
    if not bool((times[1:] > times[:-1]).all()):
        raise ValueError("times must be strictly increasing")
    if cfg_scale != 0 and uncond_logits_fn is None:
        raise ValueError("cfg_scale != 0 needs uncond_logits_fn")
    path.check_tokens(x0, "x0")
    leader = _branch_leaders(x0.shape[0], branch_steps, group_size, x0.device)
    if leader is not None:
        x0 = x0[leader(0)]
    x, records, greedy, entropy = x0, [], [], []
    for k in range(times.numel() - 1):
        t, h = float(times[k]), float(times[k + 1] - times[k])
        uncond = uncond_logits_fn(x, t) if cfg_scale != 0 else None
        log_probs = guided_log_probs(logits_fn(x, t), uncond, cfg_scale, temperature)
        probs = log_probs.exp()
        if record_greedy:
            greedy.append(probs.argmax(-1))
        if record_entropy:
            entropy.append(-(probs * log_probs.nan_to_num(neginf=0.0)).sum(-1).mean(-1))
        rec = sample_step_recorded(path, probs, x, t, h, generator, num_draws, head_size)
        if leader is not None:
            rows = leader(k + 1)
            rec = StepRecord(**{f.name: getattr(rec, f.name)[rows] for f in fields(rec)})
        records.append(rec)
        x = rec.x_next
    stacked = {name: torch.stack([getattr(r, name) for r in records], dim=1) for name in _PER_STEP}
    states = torch.stack([x0] + [r.x_next for r in records], dim=1)
    greedy_canvas = torch.stack(greedy, dim=1) if record_greedy else None
    step_entropy = torch.stack(entropy, dim=1) if record_entropy else None
    return Trajectory(states=states, times=times, greedy=greedy_canvas, entropy=step_entropy, **stacked)
