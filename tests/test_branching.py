"""Branched rollouts (step-level credit): groups share their trajectory up to the branch step and
are independent after it, and a branched row is still a draw from the policy."""

from __future__ import annotations

import pytest
import torch
from scipy.stats import chisquare

from dflow_trl.sampling import sample_trajectory

from .helpers import V_SMALL, small_paths

PATHS = ["mask", "uniform", "metric"]


def _logits_fn(d: int, seed: int = 3):
    """A fixed posterior that depends on the current state, so earlier steps matter."""
    table = torch.randn(V_SMALL, d, V_SMALL, generator=torch.Generator().manual_seed(seed))

    def fn(x: torch.LongTensor, t: float) -> torch.Tensor:
        out = table[x[:, 0]].clone() + 0.5 * table[x[:, -1]].flip(1)
        return out

    return fn


def _x0(path, b: int, d: int, seed: int) -> torch.LongTensor:
    return path.sample_source((b, d), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", PATHS)
def test_groups_share_the_prefix_and_branch_at_their_step(name):
    path = small_paths()[name]
    b, d, g, k_steps = 12, 3, 4, 4
    branch = torch.tensor([0] * 4 + [2] * 4 + [3] * 4)
    traj = sample_trajectory(
        path, _logits_fn(d), _x0(path, b, d, 0), num_steps=k_steps, branch_steps=branch, group_size=g,
        generator=torch.Generator().manual_seed(1),
    )  # fmt: skip
    for grp in range(b // g):
        rows = traj.states[grp * g : (grp + 1) * g]
        k = int(branch[grp * g])
        assert (rows[:, : k + 1] == rows[:1, : k + 1]).all()  # x_0 .. x_k shared
        # Per-step records of the shared steps are the first row's too.
        recs = traj.old_log_prob[grp * g : (grp + 1) * g, :k]
        assert (recs == recs[:1]).all()
    if name == "mask":
        return  # the masked source is one state: nothing to compare at x_0
    # Without branching the rows of a group start independently.
    free = sample_trajectory(
        path, _logits_fn(d), _x0(path, b, d, 0), num_steps=k_steps, generator=torch.Generator().manual_seed(1)
    )
    assert not (free.states[:4, 0] == free.states[:1, 0]).all()


@pytest.mark.parametrize("name", PATHS)
def test_a_branched_row_is_still_a_draw_from_the_policy(name):
    """Final states of the non-first rows of branched groups have the law of unbranched rollouts
    (chi-square on the V^D final states, D = 2)."""
    path = small_paths()[name]
    d, g, n = 2, 4, 6000
    fn = _logits_fn(d, seed=5)
    branch = torch.randint(0, 3, (n // g,), generator=torch.Generator().manual_seed(2)).repeat_interleave(g)
    gen = torch.Generator().manual_seed(4)
    branched = sample_trajectory(
        path, fn, _x0(path, n, d, 6), num_steps=3, branch_steps=branch, group_size=g, generator=gen
    )
    free = sample_trajectory(path, fn, _x0(path, 3 * n, d, 7), num_steps=3, generator=gen)
    keep = torch.arange(n) % g != 0  # one row per group is the shared trajectory itself
    code = lambda s: s[:, 0] * V_SMALL + s[:, 1]  # noqa: E731
    obs = torch.bincount(code(branched.final[keep]), minlength=V_SMALL**2).double()
    ref = torch.bincount(code(free.final), minlength=V_SMALL**2).double() + 0.5
    expected = ref / ref.sum() * obs.sum()
    assert chisquare(obs.numpy(), expected.numpy()).pvalue > 1e-3


def test_branching_input_is_checked():
    path = small_paths()["uniform"]
    x0 = _x0(path, 6, 2, 0)
    with pytest.raises(ValueError, match="whole groups"):
        sample_trajectory(
            path, _logits_fn(2), x0, num_steps=2, branch_steps=torch.zeros(6, dtype=torch.long), group_size=4
        )
    with pytest.raises(ValueError, match="same step"):
        sample_trajectory(
            path, _logits_fn(2), x0, num_steps=2, branch_steps=torch.tensor([0, 1, 0, 0, 0, 0]), group_size=3
        )
    with pytest.raises(ValueError, match="one step per row"):
        sample_trajectory(
            path, _logits_fn(2), x0, num_steps=2, branch_steps=torch.zeros(3, dtype=torch.long), group_size=3
        )


@pytest.mark.parametrize("branched", [False, True])
@pytest.mark.parametrize("name", PATHS)
def test_recorded_greedy_canvas_is_the_posterior_argmax_at_x_k(name, branched):
    """``Trajectory.greedy[:, k]`` is ``argmax p_{1|t_k}(· | x_k)`` of the state the step started from
    (the shared prefix's, for branched groups), and recording it leaves the rollout unchanged."""
    path, (b, d, g) = small_paths()[name], (8, 3, 4)
    fn = _logits_fn(d)
    branch = torch.tensor([1] * 4 + [2] * 4) if branched else None
    kwargs = dict(num_steps=4, branch_steps=branch, group_size=g)
    def roll(**extra):
        return sample_trajectory(
            path, fn, _x0(path, b, d, 0), generator=torch.Generator().manual_seed(1), **kwargs, **extra
        )

    traj, plain = roll(record_greedy=True), roll()
    assert plain.greedy is None and torch.equal(plain.states, traj.states)
    assert traj.greedy.shape == (b, 4, d)
    for k in range(4):
        assert torch.equal(traj.greedy[:, k], fn(traj.states[:, k], 0.0).argmax(-1))
    again = type(traj).from_dict(traj.to_dict())
    assert torch.equal(again.greedy, traj.greedy) and "flow_greedy" not in plain.to_dict()
