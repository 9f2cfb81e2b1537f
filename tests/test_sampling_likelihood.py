"""One kernel, two uses: sampler frequencies vs probabilities; estimators vs exact."""

from __future__ import annotations

import math

import pytest
import torch
from scipy.stats import chisquare

from dflow_trl.likelihood import (
    ExactEstimator,
    MonteCarloEstimator,
    PosteriorOnlyEstimator,
    StepRecord,
    TopKEstimator,
    _log_excess,
    estimate_log_prob,
    get_estimator,
    record_step,
)
from dflow_trl.paths import MixturePath
from dflow_trl.sampling import guided_log_probs, sample_step, sample_trajectory

from .helpers import V_SMALL, random_posterior, small_paths

PATHS = ["mask", "uniform", "metric"]
N_DRAWS = 24000


def _one_position(name: str, t: float, h: float):
    path = small_paths()[name]
    block = path.mask_token_id if name == "mask" else None
    probs = random_posterior((1,), V_SMALL, seed=7, temperature=0.7, block=block)[0]
    x = path.mask_token_id if name == "mask" else 1
    return path, probs, x


def _chi2(counts: torch.Tensor, probs: torch.Tensor) -> float:
    keep = probs > 0
    assert counts[~keep].sum() == 0, "sampled a transition of probability zero"
    expected = probs[keep] / probs[keep].sum() * counts.sum()
    return float(chisquare(counts[keep].double().numpy(), expected.double().numpy()).pvalue)


@pytest.mark.parametrize("name", PATHS)
@pytest.mark.parametrize(("t", "h"), [(0.25, 0.25), (0.5, 0.375), (0.75, 0.25)])
@pytest.mark.parametrize("recorded", [False, True])
def test_sampler_frequencies_match_step_probabilities(name, t, h, recorded):
    path, probs, x = _one_position(name, t, h)
    x_t = torch.full((N_DRAWS,), x)
    batch = probs.expand(N_DRAWS, V_SMALL).float()
    g = torch.Generator().manual_seed(11)
    if recorded:
        y = record_step(path, batch, x_t, t, h, generator=g, num_draws=4, head_size=2).x_next
    else:
        y = sample_step(path, batch, x_t, t, h, generator=g)
    counts = torch.bincount(y, minlength=V_SMALL)
    exact = path.step_log_prob(probs[None], torch.tensor([x]).expand(V_SMALL), torch.arange(V_SMALL), t, h)
    assert _chi2(counts, exact.double().exp()) > 1e-3


def test_averaged_rate_sampler_of_the_paper_is_a_different_distribution():
    """The official code samples from the kernel of the MC-averaged rate; a chi-square test tells it
    apart from the mixture of kernels it scores, at a training step size. Ours passes (above)."""
    path, probs, x = _one_position("metric", 0.5, 0.375)
    t, h, n = 0.5, 0.375, 24
    g = torch.Generator().manual_seed(5)
    draws = torch.multinomial(probs.float(), N_DRAWS * n, replacement=True, generator=g).view(N_DRAWS, n)
    rows = path.distance_rows(draws.reshape(-1)).view(N_DRAWS, n, V_SMALL)
    dx = path.pair_distance(torch.full_like(draws, x), draws).unsqueeze(-1)
    u = torch.softmax(-path.beta(t) * rows, -1) * path.beta_dot(t) * (dx - rows).clamp_min(0)
    u[..., x] = 0
    u_bar = u.mean(1)
    lam = u_bar.sum(-1)
    jump = torch.rand(N_DRAWS, generator=g, dtype=lam.dtype) < -torch.expm1(-h * lam)
    y = torch.where(
        jump, torch.multinomial(u_bar + 1e-300, 1, generator=g).squeeze(-1), torch.full((N_DRAWS,), x)
    )
    exact = path.step_log_prob(probs[None], torch.tensor([x]).expand(V_SMALL), torch.arange(V_SMALL), t, h)
    assert _chi2(torch.bincount(y, minlength=V_SMALL), exact.double().exp()) < 1e-6


def _recorded(name, t, h, num_draws, head_size, n_rep, seed=0):
    path, probs, x = _one_position(name, t, h)
    g = torch.Generator().manual_seed(seed)
    rec = record_step(
        path, probs.expand(n_rep, V_SMALL).float(), torch.full((n_rep,), x), t, h, g, num_draws, head_size
    )
    return path, probs, x, rec


def _theta_log_post(probs: torch.Tensor, seed: int, block: int | None = None) -> torch.Tensor:
    """A different posterior θ, near the rollout one."""
    g = torch.Generator().manual_seed(seed)
    logits = probs.double().log() + 0.5 * torch.randn(probs.shape, generator=g, dtype=torch.float64)
    if block is not None:
        logits[..., block] = -math.inf
    return torch.log_softmax(logits, -1)


@pytest.mark.parametrize("name", PATHS)
@pytest.mark.parametrize(("num_draws", "head_size"), [(8, 0), (4, 2)])
def test_estimators_are_unbiased_for_a_fixed_next_state(name, num_draws, head_size):
    """With fresh draws X_j ~ p (independent of y), E[π̂(y)] = π(y) for every y."""
    t, h = 0.5, 0.25
    path, probs, x = _one_position(name, t, h)
    reps = 6000
    g = torch.Generator().manual_seed(3)
    for y_val in range(V_SMALL):
        x_t = torch.full((reps,), x)
        y = torch.full((reps,), y_val)
        draws = torch.multinomial(probs.float(), reps * num_draws, replacement=True, generator=g).view(
            reps, num_draws
        )
        head = (
            torch.topk(probs, head_size).indices.expand(reps, head_size)
            if head_size
            else torch.zeros(reps, 0, dtype=torch.long)
        )
        floor = path.stay_floor(x_t, t, h).double()
        d_exc = _log_excess(path, x_t, y, draws, t, h, floor)
        if head_size:
            d_exc = d_exc.masked_fill((draws[..., None] == head[:, None, :]).any(-1), -math.inf)
        est = estimate_log_prob(
            (floor * (y == x_t)).log(),
            probs.log()[head],
            _log_excess(path, x_t, y, head, t, h, floor),
            torch.zeros(reps, num_draws, dtype=torch.float64),
            d_exc,
        ).exp()
        exact = path.step_log_prob(probs[None], torch.tensor([x]), torch.tensor([y_val]), t, h).exp().item()
        se = est.std().item() / math.sqrt(reps)
        assert abs(est.mean().item() - exact) <= 3 * se + 1e-9, (y_val, est.mean().item(), exact, se)


@pytest.mark.parametrize("name", PATHS)
@pytest.mark.parametrize(("num_draws", "head_size"), [(6, 0), (3, 2)])
def test_coupled_sampler_and_estimator_form_an_exact_importance_sampler(name, num_draws, head_size):
    """Reweighting rollouts of θ_old by exp(log π̂_θ − log π̂_old) gives π_θ's frequencies: the ratio is
    the exact likelihood ratio of the extended policy that the coupled sampler draws from."""
    t, h, reps = 0.5, 0.375, 40000
    path, probs, x, rec = _recorded(name, t, h, num_draws, head_size, reps)
    est = MonteCarloEstimator(num_draws) if head_size == 0 else TopKEstimator(head_size, num_draws)
    block = path.mask_token_id if name == "mask" else None
    log_theta = _theta_log_post(probs, seed=1, block=block)
    lp_theta = est.step_log_prob(path, rec, log_theta.expand(reps, V_SMALL), t, h)
    torch.testing.assert_close(
        est.step_log_prob(path, rec, probs.log().expand(reps, V_SMALL), t, h).float(), rec.old_log_prob
    )
    w = (lp_theta - rec.old_log_prob.double()).exp()
    target = path.step_log_prob(
        log_theta.exp()[None], torch.tensor([x]).expand(V_SMALL), torch.arange(V_SMALL), t, h
    ).exp()
    for v in range(V_SMALL):
        contrib = w * (rec.x_next == v)
        se = contrib.std().item() / math.sqrt(reps)
        assert abs(contrib.mean().item() - target[v].item()) <= 4 * se + 1e-6, (
            v,
            contrib.mean().item(),
            target[v].item(),
        )


@pytest.mark.parametrize("name", PATHS)
def test_top_k_with_k_equal_v_is_exact(name):
    t, h = 0.4, 0.3
    path = small_paths()[name]
    block = path.mask_token_id if name == "mask" else None
    probs = random_posterior((3, 4), V_SMALL, seed=2, block=block).float()
    x_t = torch.randint(0, V_SMALL, (3, 4), generator=torch.Generator().manual_seed(0))
    rec = record_step(
        path, probs, x_t, t, h, torch.Generator().manual_seed(1), num_draws=0, head_size=V_SMALL
    )
    logits = torch.randn(3, 4, V_SMALL, dtype=torch.float64, requires_grad=True)
    log_theta = torch.log_softmax(logits, -1)
    top = TopKEstimator(V_SMALL, 0).step_log_prob(path, rec, log_theta, t, h)
    exact = ExactEstimator().step_log_prob(path, rec, log_theta, t, h)
    torch.testing.assert_close(top, exact.to(top.dtype), atol=1e-6, rtol=1e-6)
    (g_top,) = torch.autograd.grad(top.sum(), logits, retain_graph=True)
    (g_exact,) = torch.autograd.grad(exact.sum(), logits)
    torch.testing.assert_close(g_top, g_exact, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("estimator", ["monte_carlo", "top_k", "exact", "posterior_only"])
@pytest.mark.parametrize("name", PATHS)
def test_gradients_flow_to_posterior_logits(estimator, name):
    t, h = 0.5, 0.25
    path = small_paths()[name]
    est = get_estimator(estimator, num_draws=6, top_k=2)
    probs = random_posterior((2, 8), V_SMALL, seed=4, block=getattr(path, "mask_token_id", None)).float()
    x_t = path.sample_source((2, 8), generator=torch.Generator().manual_seed(0))
    rec = record_step(path, probs, x_t, t, h, torch.Generator().manual_seed(2), est.num_draws, est.head_size)
    logits = probs.log().clamp_min(-30).clone().requires_grad_(True)
    lp = est.step_log_prob(path, rec, torch.log_softmax(logits, -1), t, h)
    assert torch.isfinite(lp).all()
    lp.sum().backward()
    assert torch.isfinite(logits.grad).all() and logits.grad.abs().sum() > 0


def test_masked_path_reduces_to_plain_posterior_ratio_of_unmasked_tokens():
    path = small_paths()["mask"]
    m = path.mask_token_id
    probs = random_posterior((4, 32), V_SMALL, seed=9, block=m).float()
    x_t = torch.full((4, 32), m)
    x_t[:, :5] = 0  # already unmasked: frozen
    t, h = 0.25, 0.25
    rec = record_step(path, probs, x_t, t, h, torch.Generator().manual_seed(0), num_draws=24)
    log_theta = _theta_log_post(probs.double(), seed=3, block=m)
    unmasked_now = (x_t == m) & (rec.x_next != m)
    assert unmasked_now.any() and ((x_t == m) & (rec.x_next == m)).any()
    plain = torch.where(
        unmasked_now,
        log_theta.gather(-1, rec.x_next[..., None]).squeeze(-1)
        - probs.double().log().gather(-1, rec.x_next[..., None]).squeeze(-1),
        torch.zeros_like(log_theta[..., 0]),
    )
    for est in (MonteCarloEstimator(24), ExactEstimator()):
        lr = est.step_log_prob(path, rec, log_theta, t, h).double() - (
            rec.old_log_prob.double()
            if est.name == "monte_carlo"
            else ExactEstimator().step_log_prob(path, rec, probs.double().log(), t, h)
        )
        torch.testing.assert_close(lr, plain, atol=1e-5, rtol=1e-5)


def test_trajectory_rollout_records_consistent_steps():
    path = small_paths()["metric"]
    g = torch.Generator().manual_seed(0)
    table = torch.randn(V_SMALL, V_SMALL, generator=g)

    def logits_fn(x, t):  # a toy posterior that depends on the current state
        return table[x] * 2

    def uncond_fn(x, t):
        return torch.zeros(*x.shape, V_SMALL)

    x0 = path.sample_source((3, 10), generator=g)
    traj = sample_trajectory(
        path,
        logits_fn,
        x0,
        num_steps=5,
        uncond_logits_fn=uncond_fn,
        cfg_scale=1.5,
        temperature=0.8,
        estimator=TopKEstimator(2, 4),
        generator=g,
    )
    assert traj.states.shape == (3, 6, 10) and traj.old_log_prob.shape == (3, 5, 10)
    assert torch.equal(traj.states[:, 0], x0)
    assert torch.equal(traj.states[:, 1], x0), "step 0 of the metric path moves nothing"
    assert torch.isfinite(traj.old_log_prob).all()
    for k in range(5):
        rec = traj.step(k)
        t, h = float(traj.times[k]), float(traj.times[k + 1] - traj.times[k])
        log_post = guided_log_probs(logits_fn(rec.x_t, t), uncond_fn(rec.x_t, t), 1.5, 0.8)
        lp = TopKEstimator(2, 4).step_log_prob(path, rec, log_post, t, h)
        torch.testing.assert_close(lp.float(), rec.old_log_prob, atol=1e-5, rtol=1e-5)
    back = type(traj).from_dict(traj.to_dict())
    assert torch.equal(back.states, traj.states) and torch.equal(back.times, traj.times)


@pytest.mark.parametrize("name", PATHS)
def test_cfg_keeps_ruled_out_tokens_out_on_every_path(name):
    """CFG on a model that rules a token out (the mask logit is -inf on the masked path) stays
    finite and keeps that token at probability 0; the guided rollout's records are finite."""
    path = small_paths()[name]
    g = torch.Generator().manual_seed(5)
    table = torch.randn(V_SMALL, V_SMALL, generator=g)
    banned = path.mask_token_id if name == "mask" else 0

    def logits_fn(x, t):
        return table[x].index_fill(-1, torch.tensor([banned]), float("-inf"))

    def uncond_fn(x, t):
        return (0.5 * table[x]).index_fill(-1, torch.tensor([banned]), float("-inf"))

    log_post = guided_log_probs(
        logits_fn(torch.arange(V_SMALL), 0.5), uncond_fn(torch.arange(V_SMALL), 0.5), 3.0
    )
    assert not log_post.isnan().any() and (log_post[:, banned] == float("-inf")).all()
    x0 = path.sample_source((4, 5), generator=g)
    traj = sample_trajectory(path, logits_fn, x0, num_steps=4, uncond_logits_fn=uncond_fn, cfg_scale=3.0,
                             estimator=TopKEstimator(2, 4), generator=g)  # fmt: skip
    assert torch.isfinite(traj.old_log_prob).all()
    if name != "mask":
        assert (traj.final != banned).all()


def test_batched_cfg_forward_equals_two_passes():
    """CFG's conditional and unconditional rows in one forward give the two-pass posterior, its
    gradients and the same rollout, to float tolerance, in one model call per step."""
    from dflow_trl.rollout import flow_log_posterior, rollout

    from .tiny import tiny_model, tiny_tokenizer

    # float64: in float32 a 2-thread matmul's reduction order alone moves single gradients by 1e-6.
    model = tiny_model("metric", time_conditioning=True, condition_pooling="ordered").double().eval()
    batch = model.prepare_flow_inputs(["a red square", "a blue circle", "red"], tiny_tokenizer())
    path = model.get_probability_path()
    canvas = path.sample_source((3, batch.canvas_length), generator=torch.Generator().manual_seed(0))
    rows = []
    model.register_forward_hook(lambda m, a, kw, out: rows.append(kw["input_ids"].shape[0]), with_kwargs=True)
    posts, grads = [], []
    for batched in (True, False):
        model.zero_grad()
        post = flow_log_posterior(model, batch, canvas, 0.4, 2.0, temperature=0.8, batch_cfg=batched)
        post.gather(-1, canvas.unsqueeze(-1)).sum().backward()
        posts.append(post.detach())
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]))
    assert rows == [6, 3, 3]
    torch.testing.assert_close(posts[0], posts[1], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-4, atol=1e-6)
    trajs = [
        rollout(
            model, batch, path, 4, cfg_scale=2.0, estimator=get_estimator("top_k", num_draws=3, top_k=2),
            generator=torch.Generator().manual_seed(1), batch_cfg=batched,
        )
        for batched in (True, False)
    ]  # fmt: skip
    assert torch.equal(trajs[0].states, trajs[1].states)
    torch.testing.assert_close(trajs[0].old_log_prob, trajs[1].old_log_prob, rtol=1e-5, atol=1e-5)


def test_posterior_only_scores_final_sample_at_source():
    log_post = torch.log_softmax(torch.randn(2, 3, V_SMALL), -1)
    x0 = torch.zeros(2, 3, dtype=torch.long)
    xk = torch.tensor([[1, 2, 3], [4, 5, 0]])
    rec = StepRecord(x0, xk, *([None] * 7))
    got = PosteriorOnlyEstimator().step_log_prob(small_paths()["uniform"], rec, log_post, 0.0, 1.0)
    torch.testing.assert_close(got, log_post.gather(-1, xk[..., None]).squeeze(-1))


def test_sampler_and_estimator_bad_inputs():
    path = small_paths()["uniform"]
    probs = random_posterior((4,), V_SMALL, seed=0).float()
    x = torch.zeros(4, dtype=torch.long)
    with pytest.raises(ValueError, match="summing to 1"):
        sample_step(path, probs * 3, x, 0.1, 0.1)
    with pytest.raises(ValueError, match="needs num_draws"):
        record_step(path, probs, x, 0.1, 0.1, head_size=2, num_draws=0)
    with pytest.raises(ValueError, match="unknown estimator"):
        get_estimator("magic")
    with pytest.raises(ValueError, match="too costly"):
        ExactEstimator().check_path(
            __import__("dflow_trl.paths", fromlist=["x"]).MetricInducedPath(torch.randn(1000, 4))
        )
    ExactEstimator().check_path(MixturePath(100000, source="uniform"))
    with pytest.raises(ValueError, match="temperature"):
        guided_log_probs(torch.zeros(2, 3), temperature=0)
    with pytest.raises(ValueError, match="increasing"):
        sample_trajectory(
            path,
            lambda x, t: torch.zeros(*x.shape, V_SMALL),
            torch.zeros(1, 2, dtype=torch.long),
            times=torch.tensor([0.0, 0.7, 0.5, 1.0]),
        )


def test_time_grid_power_concentrates_steps_near_the_source():
    from dflow_trl.sampling import time_grid

    torch.testing.assert_close(time_grid(4), torch.tensor([0, 0.25, 0.5, 0.75, 1], dtype=torch.float64))
    grid = time_grid(4, power=3.0)
    torch.testing.assert_close(grid, (torch.arange(5, dtype=torch.float64) / 4) ** 3)
    assert (grid[1:] > grid[:-1]).all() and grid[0] == 0 and grid[-1] == 1
    for bad in (0.0, -1.0, float("nan")):
        with pytest.raises(ValueError, match="power must be > 0"):
            time_grid(4, power=bad)


@pytest.mark.parametrize("kind", ["uniform", "metric"])
def test_a_continuation_from_x_k_samples_the_remaining_steps_law(kind):
    """``rollout(start=(k, x_k))`` (what ``step_baseline="rollouts"`` draws): from a fixed ``x_k`` the
    final canvases' frequencies match ``Π_{l ≥ k} π_θ(x_{l+1} | x_l)`` summed by brute force (χ²)."""
    from dflow_trl.paths import MetricInducedPath
    from dflow_trl.rollout import rollout

    from .enumerable import TableDFM, TableDFMConfig, step_matrices

    torch.manual_seed(0)
    path = MixturePath(3, source="uniform")
    if kind == "metric":
        path = MetricInducedPath(torch.randn(3, 2, generator=torch.Generator().manual_seed(2)), c=3.0, a=0.9)
    model = TableDFM(TableDFMConfig(3, 2), path=path)
    k, num_steps, n = 1, 3, 12000
    law = torch.eye(9, dtype=torch.float64)[4]  # x_k = (1, 1)
    for pi in step_matrices(model, num_steps)[k:]:
        law = law @ pi
    batch = model.prepare_flow_inputs(["a"] * n)
    start = torch.ones(n, 2, dtype=torch.long)
    traj = rollout(
        model, batch, path, num_steps, start=(k, start), generator=torch.Generator().manual_seed(3)
    )
    assert traj.num_steps == num_steps - k and torch.equal(traj.states[:, 0], start)
    counts = torch.bincount(model.state_index(traj.final), minlength=9).double()
    keep = law > 0
    assert counts[~keep].sum() == 0
    assert chisquare(counts[keep], law[keep] / law[keep].sum() * n).pvalue > 1e-3
    with pytest.raises(ValueError, match="start must be"):
        rollout(model, batch, path, num_steps, start=(num_steps, start))
