"""Euler-jump sampling of discrete flow models.

Each step draws ``x1 ~ p_{1|t}(· | x_t)`` and then ``x_{t+h} ~ K_h(x_t → · | x1)`` — exactly the
distribution ``π(y | x) = Σ_{x1} p(x1) K_h(x → y | x1)`` that :mod:`dflow_trl.likelihood` scores.
A rollout hands each step to its estimator (:meth:`~dflow_trl.likelihood.Estimator.record`), which
draws it and keeps what it will need to score the step again under new weights.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, fields

import torch

from .likelihood import PER_STEP_FIELDS, Estimator, StepRecord, record_step
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
        per_step = {name: getattr(self, name)[:, k] for name in PER_STEP_FIELDS}
        return StepRecord(x_t=self.states[:, k], x_next=self.states[:, k + 1], **per_step)

    def index(self, rows: torch.Tensor | slice) -> Trajectory:
        """The rollouts ``rows`` (the time grid is shared)."""
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        return Trajectory(
            **{k: v if k == "times" or v is None else v[rows] for k, v in values.items()}
        )

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
    logits_fn: LogitsFn | None,
    x0: torch.LongTensor,
    num_steps: int | None = None,
    times: torch.Tensor | None = None,
    uncond_logits_fn: LogitsFn | None = None,
    cfg_scale: float = 0.0,
    temperature: float = 1.0,
    estimator: Estimator | None = None,
    generator: torch.Generator | None = None,
    branch_steps: torch.LongTensor | None = None,
    group_size: int = 1,
    record_greedy: bool = False,
    record_entropy: bool = False,
    log_posterior_fn: LogitsFn | None = None,
) -> Trajectory:
    """Roll ``x0`` (``(B, D)``) from ``t = times[0]`` to ``t = 1`` with the Euler-jump sampler.

    ``x0`` is the state at ``times[0]``: ``x_0 ~ p_0`` for a grid from 0, or a recorded ``x_k`` for
    the tail ``times[k:]`` of one (a continuation, as ``step_baseline="rollouts"`` draws).

    ``logits_fn(x_t, t)`` returns ``(B, D, V)`` posterior logits for the canvas; with ``cfg_scale``
    ``w ≠ 0`` the posterior is ``softmax(((1 + w) ℓ_c - w ℓ_u) / τ)``. ``log_posterior_fn(x_t, t)``
    instead gives the rollout posterior's log-probabilities directly (the trainer passes the function
    its loss scores with, :func:`dflow_trl.rollout.flow_log_posterior`). The last step takes ``x1``.

    ``branch_steps`` (``(B,)``) makes groups of ``group_size`` consecutive rows share one
    trajectory ``x_0 .. x_k`` (their first row's) and branch at step ``k = branch_steps[row]``:
    from ``x_k`` on each row draws independently, so the rows are i.i.d. given ``x_k`` and their
    mean reward is an unbiased value of ``x_k`` (step-level credit).

    ``estimator`` draws each step and records what it scores (without one, only the exact
    estimator's old log-probability, where the path makes it cheap). ``record_greedy`` also keeps
    each step's posterior argmax (``Trajectory.greedy``),
    ``record_entropy`` its mean entropy over the canvas (``Trajectory.entropy``).
    """
    if times is None:
        times = time_grid(num_steps if num_steps is not None else 8, device=x0.device)
    times = torch.as_tensor(times, dtype=torch.float64, device=x0.device)
    if times.ndim != 1 or times.numel() < 2 or float(times[0]) < 0.0 or abs(float(times[-1]) - 1.0) > 1e-9:
        raise ValueError("times must be an increasing 1-D grid from t >= 0 to 1")
    if not bool((times[1:] > times[:-1]).all()):
        raise ValueError("times must be strictly increasing")
    if (logits_fn is None) == (log_posterior_fn is None):
        raise ValueError("give exactly one of logits_fn and log_posterior_fn")
    if cfg_scale != 0 and uncond_logits_fn is None and log_posterior_fn is None:
        raise ValueError("cfg_scale != 0 needs uncond_logits_fn")
    path.check_tokens(x0, "x0")
    leader = _branch_leaders(x0.shape[0], branch_steps, group_size, x0.device)
    if leader is not None:
        x0 = x0[leader(0)]
    x, records, greedy, entropy = x0, [], [], []
    for k in range(times.numel() - 1):
        t, h = float(times[k]), float(times[k + 1] - times[k])
        if log_posterior_fn is not None:
            log_probs = log_posterior_fn(x, t)
        else:
            uncond = uncond_logits_fn(x, t) if cfg_scale != 0 else None
            log_probs = guided_log_probs(logits_fn(x, t), uncond, cfg_scale, temperature)
        probs = log_probs.exp()
        if record_greedy:
            greedy.append(probs.argmax(-1))
        if record_entropy:
            entropy.append(-(probs * log_probs.nan_to_num(neginf=0.0)).sum(-1).mean(-1))
        if estimator is not None:
            rec = estimator.record(path, probs, x, t, h, generator)
        else:
            rec = record_step(path, probs, x, t, h, generator)
        if leader is not None:
            rows = leader(k + 1)
            rec = StepRecord(**{f.name: getattr(rec, f.name)[rows] for f in fields(rec)})
        records.append(rec)
        x = rec.x_next
    stacked = {name: torch.stack([getattr(r, name) for r in records], dim=1) for name in PER_STEP_FIELDS}
    states = torch.stack([x0] + [r.x_next for r in records], dim=1)
    greedy_canvas = torch.stack(greedy, dim=1) if record_greedy else None
    step_entropy = torch.stack(entropy, dim=1) if record_entropy else None
    return Trajectory(states=states, times=times, greedy=greedy_canvas, entropy=step_entropy, **stacked)
