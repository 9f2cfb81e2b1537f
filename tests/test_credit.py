"""Counterfactual per-block credit (``dflow_trl.credit``) is unbiased for ∇_θ E[R]: brute force on an
enumerable DFM.

The model and reward are those of ``tests/test_gradient_unbiased.py`` (V = 3, D = 2, K = 3, a table of
posterior logits per joint state, a fixed random ``R(x_1)``). The estimate is
``mean over rollouts of Σ_k Σ_i A_{k,i} ∇_θ log π_θ(x_{k+1}^i | x_k)`` with the library's advantages
and its exact per-position step log-probabilities; its projection on the unit brute-force gradient
must match ``‖∇_θ E[R]‖`` within 5 standard errors. A baseline that sees the block's action (the
continuation of ``x_{k+1}`` itself, with fresh noise) must fail the same check.
"""

from __future__ import annotations

import math

import pytest
import torch

from dflow_trl.credit import counterfactual_advantages, seeded_rollout, square_blocks
from dflow_trl.likelihood import get_estimator
from dflow_trl.paths import MetricInducedPath
from dflow_trl.rollout import flow_log_posterior
from dflow_trl.sampling import time_grid

from .enumerable import TableDFM, TableDFMConfig, brute_force_value_and_grad
from .test_gradient_unbiased import REWARD, D, V, make_path

K, N, REPS, BAND = 3, 2048, 12, 5.0
PLACE = torch.tensor([V ** (D - 1 - i) for i in range(D)])


def table_reward(canvas: torch.LongTensor) -> torch.Tensor:
    return REWARD[(canvas * PLACE).sum(-1)]


def _estimate(model, path, blocks, leak: bool = False) -> torch.Tensor:
    """``(REPS, S, D, V)`` per-batch gradient estimates of E[R]."""
    est = get_estimator("exact")
    batch = model.prepare_flow_inputs(["x"] * N)
    times = time_grid(K).double()
    out = []
    for rep in range(REPS):
        seeds = [1000 * rep + k for k in range(K)]
        x0 = path.sample_source((N, D), generator=torch.Generator().manual_seed(999 + rep))
        traj = seeded_rollout(model, batch, path, times, seeds, x0, estimator=est)
        if leak:
            rewards = table_reward(traj.final)
            adv = torch.zeros(N, K, D, dtype=torch.float64)
            for k in range(K - 1):  # the last step's leaked baseline would be R itself
                fresh = [s + 500 for s in seeds]
                tail = seeded_rollout(model, batch, path, times, fresh, traj.states[:, k + 1], k + 1)
                adv[:, k] = (rewards - table_reward(tail.final)).unsqueeze(-1)
        else:
            _, adv = counterfactual_advantages(model, batch, path, traj, seeds, table_reward, blocks)
        model.zero_grad()
        for k in range(K):
            rec = traj.step(k)
            t, h = float(times[k]), float(times[k + 1] - times[k])
            per_pos = est.step_log_prob(path, rec, flow_log_posterior(model, batch, rec.x_t, t), t, h)
            (-(adv[:, k] * per_pos).sum() / N).backward()
        out.append(-model.logits.grad.detach().clone())
    return torch.stack(out)


def _projection(model, path, blocks, leak=False) -> tuple[float, float, float]:
    _, exact = brute_force_value_and_grad(model, REWARD, K)
    grads = _estimate(model, path, blocks, leak)
    unit = exact / exact.norm()
    proj = (grads * unit).flatten(1).sum(-1) / exact.norm()
    mean = grads.mean(0)
    cos = float((mean * exact).sum() / (mean.norm() * exact.norm()))
    return float(proj.mean()), float(proj.std() / math.sqrt(REPS)), cos


@pytest.mark.parametrize("kind", ["uniform", "metric"])
@pytest.mark.parametrize("blocks", [[0, 1], [0, 0]], ids=["per_position", "one_block"])
def test_counterfactual_credit_matches_brute_force(kind, blocks):
    model = TableDFM(TableDFMConfig(vocab=V, canvas=D, seed=0), path=make_path(kind))
    mean, se, cos = _projection(model, model.path, torch.tensor(blocks))
    assert abs(mean - 1.0) < BAND * se, (mean, se)
    assert cos > 0.98, cos


@pytest.mark.parametrize("kind", ["uniform", "metric"])
def test_a_baseline_that_sees_the_action_is_caught_as_biased(kind):
    model = TableDFM(TableDFMConfig(vocab=V, canvas=D, seed=0), path=make_path(kind))
    mean, se, _ = _projection(model, model.path, torch.tensor([0, 1]), leak=True)
    assert abs(mean - 1.0) > BAND * se, (mean, se)


def test_seeded_rollout_repeats_its_noise_and_a_block_that_did_not_move_gets_no_credit():
    model = TableDFM(TableDFMConfig(vocab=V, canvas=D, seed=0), path=make_path("metric"))
    path, batch, times = model.path, model.prepare_flow_inputs(["x"] * 64), time_grid(K).double()
    x0 = path.sample_source((64, D), generator=torch.Generator().manual_seed(0))
    a = seeded_rollout(model, batch, path, times, [1, 2, 3], x0)
    b = seeded_rollout(model, batch, path, times, [1, 2, 3], x0)
    assert torch.equal(a.states, b.states)
    tail = seeded_rollout(model, batch, path, times, [1, 2, 3], a.states[:, 1], first_step=1)
    assert torch.equal(tail.final, a.final)
    _, adv = counterfactual_advantages(model, batch, path, a, [1, 2, 3], table_reward, torch.tensor([0, 1]))
    stayed = a.states[:, 1:] == a.states[:, :-1]  # (B, K, D)
    assert bool((adv[stayed] == 0).all())
    assert bool((adv[~stayed] != 0).any())


def test_square_blocks_cut_the_canvas_into_squares():
    blocks = square_blocks(16, 2).view(4, 4)
    assert blocks.tolist() == [[0, 0, 1, 1], [0, 0, 1, 1], [2, 2, 3, 3], [2, 2, 3, 3]]
    with pytest.raises(ValueError, match="divide"):
        square_blocks(16, 3)
    with pytest.raises(ValueError, match="square canvas"):
        square_blocks(12, 2)


@pytest.mark.parametrize("kind", ["uniform", "metric", "masked"])
def test_draws_from_noise_follow_the_step_kernel(kind):
    """``record_step(noise=...)`` samples ``π(y | x) = Σ_{x1} p(x1) K_h(x → y | x1)``: frequencies of
    200,000 draws per state against the path's exact step probability."""
    from dflow_trl.likelihood import record_step
    from dflow_trl.paths import MixturePath

    v = 5
    if kind == "metric":
        path = MetricInducedPath(torch.randn(v, 2, generator=torch.Generator().manual_seed(3)), c=3.0, a=0.9)
    elif kind == "masked":
        path = MixturePath(v, source="mask", mask_token_id=v - 1)
    else:
        path = MixturePath(v, source="uniform")
    gen = torch.Generator().manual_seed(0)
    n = 200_000
    x_t = torch.arange(v).repeat_interleave(n // v)
    if kind == "masked":
        x_t = torch.full_like(x_t, v - 1)
    post = torch.softmax(torch.randn(v, generator=gen), -1)
    if kind == "masked":
        post = torch.cat([post[: v - 1] / post[: v - 1].sum(), torch.zeros(1)])
    probs = post.expand(n, v).contiguous()
    t, h = 0.3, 0.2
    noise = torch.rand((2, n), generator=gen)
    y = record_step(path, probs, x_t, t, h, noise=noise).x_next
    for x in x_t.unique().tolist():
        rows = x_t == x
        freq = torch.bincount(y[rows], minlength=v).double() / rows.sum()
        exact = torch.stack([
            path.step_log_prob(post.unsqueeze(0), torch.tensor([x]), torch.tensor([j]), t, h).exp().squeeze()
            for j in range(v)
        ]).double()  # fmt: skip
        se = (exact * (1 - exact) / rows.sum()).sqrt()
        assert bool(((freq - exact).abs() <= 5 * se + 1e-9).all()), (x, freq, exact)
