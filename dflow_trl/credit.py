"""Per-block counterfactual credit: each block of positions is credited for what its own jumps did.

One step's kernel factorises over positions given ``x_k``: ``π_θ(x_{k+1} | x_k) = Π_i π_θ(x_{k+1}^i | x_k)``.
So the score of the positions of a block β has zero mean given ``x_k``, the other blocks' actions
``x_{k+1}^{−β}`` and any noise ξ drawn independently of β's action, and a baseline for β may depend on
all of them:

    ∇_θ E[R] = E[ Σ_k Σ_β (R − b_{k,β}) Σ_{i∈β} ∇_θ log π_θ(x_{k+1}^i | x_k) ],
    b_{k,β} = F(x_{k+1}[β ← x_k^β], ξ_{k+1:}).

``F(x, ξ_{k+1:})`` continues the canvas ``x`` from ``t_{k+1}`` to 1 with the rollout's *own* noise of
steps ``k+1 .. K−1`` (every step draws from a generator seeded per step: common random numbers)
and scores the result. ``x_{k+1}[β ← x_k^β]`` undoes block β's jumps of step k, and ξ_{k+1:} is
independent of step k's draws, so ``b_{k,β}`` never sees β's action: the gradient is unbiased for
any blocks (``tests/test_credit.py`` checks it against brute force). Since ``R = F(x_{k+1}, ξ_{k+1:})``
is the same continuation of the state β's jumps did produce, ``R − b_{k,β}`` is the change those
jumps made to this very outcome: zero for a block whose jumps did not matter, and free of the later
steps' noise wherever the two coupled continuations decide alike. A block that did not move gets 0.

Cost: one continuation of the whole batch per block and step, ``n_blocks · K (K − 1) / 2`` forwards
beside the rollout's K, no backward. With one block the baseline is ``F(x_k, ξ_{k+1:})`` (the state
before step k, continued from ``t_{k+1}``): step-level credit with a coupled value.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from .likelihood import PER_STEP_FIELDS, Estimator, StepRecord, record_step
from .models.base import FlowInputs
from .paths.base import ProbabilityPath
from .rollout import flow_log_posterior
from .sampling import Trajectory

RewardFn = Callable[[torch.LongTensor], torch.Tensor]


def square_blocks(canvas_length: int, per_side: int) -> torch.LongTensor:
    """``(D,)`` block index of each position of a square canvas cut into ``per_side²`` square blocks
    (row-major positions; ``per_side`` must divide the side)."""
    side = round(canvas_length**0.5)
    if side * side != canvas_length:
        raise ValueError(f"square_blocks needs a square canvas, got {canvas_length} positions")
    if per_side < 1 or side % per_side:
        raise ValueError(f"per_side must divide the canvas side {side}, got {per_side}")
    size = side // per_side
    pos = torch.arange(canvas_length)
    return (pos // side // size) * per_side + (pos % side) // size


def _step(
    model: Any, batch: FlowInputs, path: ProbabilityPath, x: torch.LongTensor, t: float, h: float, seed: int,
    estimator: Estimator | None, cfg_scale: float, temperature: float,
) -> StepRecord:
    probs = flow_log_posterior(model, batch, x, t, cfg_scale, temperature).exp()
    gen = torch.Generator(device=x.device).manual_seed(int(seed))
    # Every position's x1 and x_next come from its own two uniforms, so a continuation of a state
    # that differs in one block draws exactly as the rollout did wherever the inputs agree.
    noise = torch.rand((2, *x.shape), generator=gen, device=x.device)
    if estimator is not None:
        return estimator.record(path, probs, x, t, h, gen, noise=noise)
    return record_step(path, probs, x, t, h, gen, noise=noise)


@torch.no_grad()
def seeded_rollout(
    model: Any,
    batch: FlowInputs,
    path: ProbabilityPath,
    times: torch.Tensor,
    seeds: Sequence[int],
    x_start: torch.LongTensor,
    first_step: int = 0,
    estimator: Estimator | None = None,
    cfg_scale: float = 0.0,
    temperature: float = 1.0,
) -> Trajectory:
    """Roll ``x_start`` (the state at ``times[first_step]``) to ``t = 1``, step k drawing from a generator
    seeded with ``seeds[k]``: two calls with the same seeds use the same noise for every row."""
    num_steps = times.numel() - 1
    if len(seeds) != num_steps:
        raise ValueError(f"need one seed per step ({num_steps}), got {len(seeds)}")
    if not 0 <= first_step < num_steps:
        raise ValueError(f"first_step must be in [0, {num_steps}), got {first_step}")
    x, records = x_start, []
    for k in range(first_step, num_steps):
        t, h = float(times[k]), float(times[k + 1] - times[k])
        rec = _step(model, batch, path, x, t, h, seeds[k], estimator, cfg_scale, temperature)
        records.append(rec)
        x = rec.x_next
    stacked = {name: torch.stack([getattr(r, name) for r in records], dim=1) for name in PER_STEP_FIELDS}
    states = torch.stack([x_start] + [r.x_next for r in records], dim=1)
    return Trajectory(states=states, times=times[first_step:], **stacked)


@torch.no_grad()
def counterfactual_advantages(
    model: Any,
    batch: FlowInputs,
    path: ProbabilityPath,
    trajectory: Trajectory,
    seeds: Sequence[int],
    reward_fn: RewardFn,
    blocks: torch.LongTensor,
    steps: Sequence[int] | None = None,
    cfg_scale: float = 0.0,
    temperature: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(rewards (B,), advantages (B, K, D))``: ``A_{k,i} = R − F(x_{k+1}[β(i) ← x_k^{β(i)}], ξ_{k+1:})``
    (module doc) for the steps ``steps`` (all by default; other steps get 0).

    ``trajectory`` must come from :func:`seeded_rollout` with ``seeds`` from step 0; ``reward_fn``
    maps ``(B, D)`` canvases to ``(B,)`` rewards; ``blocks`` is ``(D,)`` block indices."""
    states = trajectory.states
    b, k_total, d = states.shape[0], states.shape[1] - 1, states.shape[2]
    if tuple(blocks.shape) != (d,):
        raise ValueError(f"blocks must be ({d},) block indices, got shape {tuple(blocks.shape)}")
    times = trajectory.times
    rewards = reward_fn(trajectory.final).to(torch.float64)
    adv = torch.zeros(b, k_total, d, dtype=torch.float64, device=states.device)
    for k in range(k_total) if steps is None else steps:
        x_k, x_next = states[:, k], states[:, k + 1]
        for block in blocks.unique().tolist():
            where = blocks == block
            undone = x_next.clone()
            undone[:, where] = x_k[:, where]
            moved = (undone != x_next).any(-1)
            if not bool(moved.any()):
                continue
            if k + 1 < k_total:
                tail = seeded_rollout(
                    model, batch, path, times, seeds, undone, k + 1,
                    cfg_scale=cfg_scale, temperature=temperature,
                )  # fmt: skip
                value = reward_fn(tail.final).to(torch.float64)
            else:
                value = reward_fn(undone).to(torch.float64)
            # A block that did not move has F(x_{k+1}, ξ) = R by construction: credit 0 exactly.
            value = torch.where(moved, value, rewards)
            adv[:, k, where] = (rewards - value).unsqueeze(-1)
    return rewards, adv
