"""Probability paths: kernels, exact step probabilities against brute force, validation."""

from __future__ import annotations

import math

import pytest
import torch

from dflow_trl.paths import MetricInducedPath, MixturePath, build_path

from .helpers import V_SMALL, brute_kernel, brute_step_prob, random_posterior, small_paths

STEPS = [(0.0, 0.25), (0.2, 0.3), (0.5, 0.05), (0.75, 0.25), (0.9, 0.1)]
PATHS = ["mask", "uniform", "metric"]


@pytest.mark.parametrize("name", PATHS)
@pytest.mark.parametrize(("t", "h"), STEPS)
def test_kernel_sums_to_one_and_matches_formula(name, t, h):
    path = small_paths()[name]
    V = path.vocab_size
    x = torch.arange(V).repeat_interleave(V)
    x1 = torch.arange(V).repeat(V)
    total = torch.zeros(V * V, dtype=torch.float64)
    for y in range(V):
        k = path.kernel_log_prob(x, torch.full_like(x, y), x1, t, h).double().exp()
        total += k
        ref = torch.tensor(
            [brute_kernel(path, int(a), y, int(b), t, h) for a, b in zip(x, x1)], dtype=torch.float64
        )
        torch.testing.assert_close(k, ref, atol=1e-9, rtol=1e-7)
    torch.testing.assert_close(total, torch.ones_like(total), atol=1e-9, rtol=0)


@pytest.mark.parametrize("name", PATHS)
@pytest.mark.parametrize(("t", "h"), STEPS)
def test_step_log_prob_matches_brute_force(name, t, h):
    path = small_paths()[name]
    V = path.vocab_size
    block = path.mask_token_id if name == "mask" else None
    probs = random_posterior((2, 5), V, seed=1, block=block)
    g = torch.Generator().manual_seed(2)
    x = torch.randint(0, V, (2, 5), generator=g)
    if name == "mask":
        x[:, :3] = path.mask_token_id
    for y_val in range(V):
        y = torch.full_like(x, y_val)
        got = path.step_log_prob(probs, x, y, t, h).exp()
        ref = torch.tensor(
            [
                [brute_step_prob(path, probs[i, j].tolist(), int(x[i, j]), y_val, t, h) for j in range(5)]
                for i in range(2)
            ],
            dtype=torch.float64,
        )
        torch.testing.assert_close(got, ref, atol=1e-6, rtol=1e-6)


def test_mixture_integrated_kernel_is_a_semigroup():
    """The exact integrated kernel over [t, t+h] equals two half steps composed."""
    path = MixturePath(5, source="uniform", scheduler=3.0)
    t, h = 0.3, 0.4
    full = torch.zeros(5, 5, 5, dtype=torch.float64)
    half = torch.zeros_like(full)
    half2 = torch.zeros_like(full)
    for x1 in range(5):
        for x in range(5):
            for y in range(5):
                a, b, c = (torch.tensor([v]) for v in (x, y, x1))
                full[x1, x, y] = path.kernel_log_prob(a, b, c, t, h).exp()
                half[x1, x, y] = path.kernel_log_prob(a, b, c, t, h / 2).exp()
                half2[x1, x, y] = path.kernel_log_prob(a, b, c, t + h / 2, h / 2).exp()
    torch.testing.assert_close(full, half @ half2, atol=1e-12, rtol=0)


def test_metric_path_at_t0_moves_nothing():
    path = small_paths()["metric"]
    x = torch.arange(V_SMALL).repeat(50)
    x1 = torch.randint(0, V_SMALL, x.shape, generator=torch.Generator().manual_seed(0))
    assert torch.equal(path.sample_kernel(x, x1, 0.0, 0.125), x)
    assert not path.moves_at(0.0, 0.125)
    assert path.moves_at(0.125, 0.125) and path.moves_at(0.875, 0.125)
    probs = random_posterior((V_SMALL,), V_SMALL, seed=0)
    y = (x[:V_SMALL] + 1) % V_SMALL
    assert torch.isinf(path.step_log_prob(probs, x[:V_SMALL], y, 0.0, 0.125)).all()
    torch.testing.assert_close(
        path.step_log_prob(probs, x[:V_SMALL], x[:V_SMALL], 0.0, 0.125),
        torch.zeros(V_SMALL, dtype=torch.float64),
    )


def test_metric_rates_move_only_closer_to_x1():
    """u_t(y, x | x1) > 0 only where d(y, x1) < d(x, x1): jumps never move away from x1."""
    path = small_paths(10)["metric"]
    x = torch.arange(10).repeat_interleave(10)
    x1 = torch.arange(10).repeat(10)
    for y in range(10):
        yy = torch.full_like(x, y)
        k = path.kernel_log_prob(x, yy, x1, 0.4, 0.2).exp()
        farther = path.pair_distance(yy, x1) >= path.pair_distance(x, x1)
        assert (k[farther & (yy != x)] == 0).all()


@pytest.mark.parametrize("cached", [True, False])
def test_metric_exit_rate_equals_the_direct_sum_over_the_vocabulary(cached):
    """The sorted-prefix exit rate equals ``β̇ Σ_y p_t(y | x1) [d(x, x1) - d(y, x1)]_+`` summed
    directly, with tied distances (every embedding row three times) and one x1 per chunk."""
    g = torch.Generator().manual_seed(5)
    path = MetricInducedPath(torch.randn(20, 3, generator=g).repeat(3, 1), chunk_elements=256)
    if not cached:
        path.SORT_CACHE_ELEMENTS = 0
    x, x1 = torch.randint(0, 60, (2, 500), generator=g)
    x[:50] = x1[:50]
    for t in (0.05, 0.5, 0.95):
        rows = path.distance_rows(x1)
        p = torch.softmax(-path.beta(t) * rows, -1)
        dx = rows.gather(1, x[:, None])
        direct = path.beta_dot(t) * (p * (dx - rows).clamp_min(0)).sum(-1)
        torch.testing.assert_close(path.exit_rate(x, x1, t), direct, rtol=1e-12, atol=1e-12)


def test_metric_step_log_prob_at_fudoki_vocab_size():
    """The exact metric step works at V = 16384 for a handful of positions (chunked, bounded memory)."""
    V = 16384
    g = torch.Generator().manual_seed(0)
    path = MetricInducedPath(torch.randn(V, 8, generator=g))
    probs = torch.softmax(torch.randn(3, V, generator=g) * 3, -1)
    x = torch.randint(0, V, (3,), generator=g)
    x1 = torch.multinomial(probs, 1, generator=g).squeeze(-1)
    y = path.sample_kernel(x, x1, 0.5, 0.125, generator=g)
    lp = path.step_log_prob(probs, x, y, 0.5, 0.125)
    assert torch.isfinite(lp).all() and (lp <= 0).all()
    # the exact sum dominates the single term of the x1 that produced y
    own = torch.log(probs[torch.arange(3), x1].double()) + path.kernel_log_prob(x, y, x1, 0.5, 0.125)
    assert (lp.double() >= own - 1e-5).all()


def test_sample_conditional_matches_path_marginals():
    path = small_paths()["metric"]
    x1 = torch.full((40000,), 2)
    xt = path.sample_conditional(x1, 0.5, generator=torch.Generator().manual_seed(0))
    freq = torch.bincount(xt, minlength=V_SMALL).double() / x1.numel()
    expect = torch.softmax(-path.beta(0.5) * path.distance_rows(torch.tensor([2]))[0], -1)
    assert (freq - expect).abs().max() < 0.01
    mix = small_paths()["mask"]
    xt = mix.sample_conditional(torch.zeros(40000, dtype=torch.long), torch.tensor(0.5))
    assert abs((xt == 0).double().mean().item() - 0.25) < 0.01  # κ_t = t^2
    assert set(xt.unique().tolist()) <= {0, mix.mask_token_id}


def test_bad_inputs_raise_clear_errors():
    paths = small_paths()
    metric, mask = paths["metric"], paths["mask"]
    probs = random_posterior((4,), V_SMALL, seed=0)
    x = torch.zeros(4, dtype=torch.long)
    with pytest.raises(ValueError, match="classes"):
        metric.step_log_prob(random_posterior((4,), V_SMALL + 1, seed=0), x, x, 0.2, 0.1)
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        metric.step_log_prob(probs, x, x, 1.0, 0.1)
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        mask.step_log_prob(probs, x, x, -0.1, 0.1)
    with pytest.raises(ValueError, match="h must be > 0"):
        metric.kernel_log_prob(x, x, x, 0.2, 0.0)
    with pytest.raises(ValueError, match="h must be > 0"):
        mask.kernel_log_prob(x, x, x, 0.2, -0.1)
    with pytest.raises(ValueError, match="token ids"):
        metric.step_log_prob(probs, x + V_SMALL, x, 0.2, 0.1)
    with pytest.raises(ValueError, match="token ids"):
        mask.kernel_log_prob(x, x, x + 99, 0.2, 0.1)
    with pytest.raises(ValueError, match="summing to 1"):
        metric.step_log_prob(probs * 2, x, x, 0.2, 0.1)
    with pytest.raises(ValueError, match="summing to 1"):
        mask.step_log_prob(torch.log(probs), x, x, 0.2, 0.1)
    with pytest.raises(ValueError, match="must not pass 1"):
        mask.kernel_log_prob(x, x, x, 0.9, 0.2)
    with pytest.raises(ValueError, match="zero"):
        MetricInducedPath(torch.zeros(4, 3))
    with pytest.raises(ValueError, match=r"\(V, E\)"):
        MetricInducedPath(torch.randn(5))
    with pytest.raises(ValueError, match="mask_token_id"):
        MixturePath(5, source="mask")
    with pytest.raises(ValueError, match="source"):
        MixturePath(5, source="gaussian")
    assert math.isfinite(float(mask.step_log_prob(probs, x, x, 0.2, 0.1).sum()))


def test_build_path_reads_every_spec_kind_and_names_bad_ones():
    emb = torch.eye(3).tolist()
    metric = build_path({"type": "metric", "embeddings": emb, "c": 2.0, "a": 1.0}, 3, None)
    assert isinstance(metric, MetricInducedPath) and metric.vocab_size == 3
    masked = build_path({"type": "mask", "exponent": 2.0}, 4, 3)
    assert isinstance(masked, MixturePath) and masked.source == "mask" and masked.mask_token_id == 3
    t = torch.tensor([0.5])
    assert torch.allclose(masked.scheduler.kappa(t), t**2)
    assert build_path({"type": "uniform"}, 4, 3).mask_token_id is None
    with pytest.raises(ValueError, match="needs 'embeddings'"):
        build_path({"type": "metric"}, 3, None)
    with pytest.raises(ValueError, match="4 rows"):
        build_path({"type": "metric", "embeddings": torch.eye(4).tolist()}, 3, None)
    with pytest.raises(ValueError, match="unknown path type 'gaussian'"):
        build_path({"type": "gaussian"}, 3, None)
