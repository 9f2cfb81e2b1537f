"""The trainer's policy gradient is unbiased for ∇_θ E[R]: checked against brute force on an enumerable DFM.

The model is a table (``tests.enumerable.TableDFM``): V = 3 tokens, D = 2 canvas positions, one row of
posterior logits per joint state ``x_t`` (9 states) and position, shared by every step as FUDOKI's
posterior is (it is not given t). ``R(x_1)`` is a fixed random table over the 9 final canvases.
With K = 3 steps there are 9^4 trajectories, so ``∇_θ E[R]`` is computed exactly by summing
``p(x_0) Π_k π_θ(x_{k+1} | x_k) R(x_K)`` over all of them (π_θ from the kernel re-derived in
``tests.helpers.brute_kernel``) and autograd. K = 3 rather than 2 because step 0 of the metric path
cannot move (β̇_0 = 0): with K = 2 and the last step dropped nothing would be left to train.

The estimate goes through the real ``DFlowGRPOTrainer.train()``: M optimizer steps at learning rate 0
(θ never moves), each on B fresh rollouts of the library's sampler, the gradient read just before
the optimizer step (no clipping). At the first pass over a batch the ratio is 1, so the GRPO loss
gradient is the score-function gradient times the advantages. With ``scale_rewards="none"`` the
advantage is ``R_i − mean_G R`` (a baseline that leaves the estimate unbiased up to a factor
``1 − 1/G``), and the default ``dapo`` loss averages over the T trained steps of the B rollouts and the
step's ``mean`` aggregation over the D positions, so

    E[−∇ loss] = (1 − 1/G) / (T · D) · ∇_θ E[R].

Each batch gradient is divided by that constant; the check projects the M estimates on the unit
brute-force direction and asserts their mean matches ``‖∇E[R]‖`` within 5 standard errors (and the
cosine of the mean estimate with the exact gradient is near 1). The same check fails by many
standard errors for the paper's step selection (``include_last_step=False``: steps 0..K−2 only) and for
the d1 surrogate ``posterior_only``. Branched rollouts (``rollout_branching``) pass it.
"""

from __future__ import annotations

import functools
import math
import os

import pytest
import torch
from datasets import Dataset
from transformers import TrainerCallback

from dflow_trl import DFlowGRPOConfig, DFlowGRPOTrainer
from dflow_trl.paths import MetricInducedPath, MixturePath

from .enumerable import TableDFM, TableDFMConfig, brute_force_value_and_grad
from .tiny import tiny_tokenizer

os.environ.setdefault("HF_HUB_OFFLINE", "1")

V, D, K, G = 3, 2, 3, 8
REWARD = torch.randn(V**D, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
BAND = 5.0  # standard errors


def make_path(kind: str):
    if kind == "uniform":
        return MixturePath(V, source="uniform")
    return MetricInducedPath(torch.randn(V, 2, generator=torch.Generator().manual_seed(2)), c=3.0, a=0.9)


def table_reward(prompts, completions, completion_ids, **kwargs) -> list[float]:
    index = [sum(c * V ** (D - 1 - i) for i, c in enumerate(ids)) for ids in completion_ids]
    return REWARD[index].tolist()


@functools.cache
def exact_gradient(kind: str, time_power: float = 1.0) -> torch.Tensor:
    model = TableDFM(TableDFMConfig(V, D), path=make_path(kind))
    _, grad = brute_force_value_and_grad(model, REWARD, K, time_power=time_power)
    return grad


class _GradientTap(TrainerCallback):
    def __init__(self, param: torch.Tensor) -> None:
        self.param, self.grads = param, []

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        self.grads.append(self.param.grad.detach().clone())


def trainer_gradients(tmp_path, kind: str, batch: int, steps: int, seed: int = 0, **config) -> torch.Tensor:
    """``(steps, *θ.shape)``: each training step's gradient, rescaled to estimate ``∇_θ E[R]``."""
    model = TableDFM(TableDFMConfig(V, D), path=make_path(kind))
    args = DFlowGRPOConfig(
        output_dir=str(tmp_path / "out"),
        use_cpu=True,
        bf16=False,
        gradient_checkpointing=False,
        per_device_train_batch_size=batch,
        num_generations=G,
        max_steps=steps,
        learning_rate=0.0,
        max_grad_norm=0.0,
        scale_rewards="none",
        num_flow_steps=K,
        num_mc_samples=4,
        top_k_size=1,
        report_to="none",
        save_strategy="no",
        logging_steps=10**6,
        log_sample_images=0,
        disable_tqdm=True,
        seed=seed,
        **config,
    )
    trainer = DFlowGRPOTrainer(
        model=model,
        reward_funcs=table_reward,
        args=args,
        train_dataset=Dataset.from_dict({"prompt": ["a"] * (batch // G)}),
        processing_class=tiny_tokenizer(),
    )
    assert args.loss_type == "dapo" and args.beta == 0 and args.num_iterations == 1
    tap = _GradientTap(model.logits)
    trainer.add_callback(tap)
    trainer.train()
    assert len(tap.grads) == steps
    # T: the trainable steps. Branched rollouts train one of them per rollout, uniformly per group,
    # which gives the same expectation as training all T with the loss's 1/T.
    trained = len(trainer._trainable_steps(K))
    assert trainer.max_completion_length == (1 if config.get("rollout_branching") else trained)
    scale = (1 - 1 / G) / (trained * D)
    return -torch.stack(tap.grads) / scale


def projection(grads: torch.Tensor, exact: torch.Tensor) -> tuple[float, float, float]:
    """Mean and standard error of the estimates projected on the unit exact direction; cosine of their
    mean."""
    unit = (exact / exact.norm()).flatten()
    proj = grads.flatten(1) @ unit
    cos = torch.nn.functional.cosine_similarity(grads.mean(0).flatten(), exact.flatten(), dim=0)
    return proj.mean().item(), proj.std().item() / math.sqrt(proj.numel()), cos.item()


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny tensors: one intra-op thread is several times faster than two on a busy 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


PATHS = ["uniform", "metric"]
ESTIMATORS = ["exact", "monte_carlo", "top_k"]


def test_default_config_trains_the_last_step(tmp_path):
    assert DFlowGRPOConfig(str(tmp_path), use_cpu=True, bf16=False).include_last_step is True


@pytest.mark.parametrize("estimator", ESTIMATORS)
@pytest.mark.parametrize("kind", PATHS)
def test_policy_gradient_matches_brute_force(tmp_path, kind, estimator):
    """Default step selection (last step trained): the mean estimate equals ∇E[R] within 5 SE."""
    exact = exact_gradient(kind)
    mean, se, cos = projection(trainer_gradients(tmp_path, kind, 512, 12, estimator=estimator), exact)
    target = exact.norm().item()
    assert abs(mean - target) <= BAND * se, f"projection {mean:.4f} ± {se:.4f} vs exact {target:.4f}"
    assert se < 0.05 * target  # the band is tight enough to catch a bias of 25% of the gradient
    assert cos > 0.95, cos


@pytest.mark.parametrize("estimator", ["exact", "top_k"])
@pytest.mark.parametrize("kind", PATHS)
def test_branched_rollouts_match_brute_force(tmp_path, kind, estimator):
    """Step-level credit (groups share x_0..x_k, branch at a uniform trained step k, train step k
    with the siblings' mean as baseline) is unbiased too."""
    exact = exact_gradient(kind)
    grads = trainer_gradients(tmp_path, kind, 512, 16, estimator=estimator, rollout_branching=True)
    mean, se, cos = projection(grads, exact)
    target = exact.norm().item()
    assert abs(mean - target) <= BAND * se, f"projection {mean:.4f} ± {se:.4f} vs exact {target:.4f}"
    assert se < 0.06 * target
    assert cos > 0.9, cos


@pytest.mark.parametrize("kind", PATHS)
def test_shared_source_matches_brute_force(tmp_path, kind):
    """A group sharing one x_0 ~ p_0, every trained step trained: unbiased (the rollouts are i.i.d.
    given x_0, which does not depend on θ, so the group mean is an x_0-conditional baseline)."""
    exact = exact_gradient(kind)
    grads = trainer_gradients(tmp_path, kind, 512, 12, estimator="top_k", shared_source=True)
    mean, se, cos = projection(grads, exact)
    target = exact.norm().item()
    assert abs(mean - target) <= BAND * se, f"projection {mean:.4f} ± {se:.4f} vs exact {target:.4f}"
    assert se < 0.05 * target
    assert cos > 0.95, cos


@pytest.mark.parametrize("estimator", ESTIMATORS)
@pytest.mark.parametrize("kind", PATHS)
def test_dropping_the_last_step_is_caught_as_biased(tmp_path, kind, estimator):
    """The paper's selection (steps 0..K−2) fails the same check by far more than the 5-SE band."""
    exact = exact_gradient(kind)
    grads = trainer_gradients(tmp_path, kind, 512, 8, estimator=estimator, include_last_step=False)
    mean, se, _ = projection(grads, exact)
    target = exact.norm().item()
    assert target - mean > 2 * BAND * se, f"projection {mean:.4f} ± {se:.4f} vs exact {target:.4f}"
    assert mean < 0.5 * target


@pytest.mark.parametrize("kind", PATHS)
def test_posterior_only_is_caught_as_biased(tmp_path, kind):
    """The d1 surrogate (score log p^θ_{1|0}(x_K | x_0)) is known to be biased; the check sees it."""
    exact = exact_gradient(kind)
    mean, se, _ = projection(trainer_gradients(tmp_path, kind, 512, 8, estimator="posterior_only"), exact)
    target = exact.norm().item()
    assert abs(mean - target) > 2 * BAND * se, f"projection {mean:.4f} ± {se:.4f} vs exact {target:.4f}"


@pytest.mark.parametrize("estimator", ["exact", "top_k"])
@pytest.mark.parametrize("kind", PATHS)
def test_greedy_step_baseline_matches_brute_force(tmp_path, kind, estimator):
    """``step_baseline="greedy"``: step k's baseline is the reward of the posterior's argmax at x_k,
    a function of x_k only, so the mean gradient is still ∇E[R] (same constant)."""
    exact = exact_gradient(kind)
    grads = trainer_gradients(tmp_path, kind, 512, 12, estimator=estimator, step_baseline="greedy")
    mean, se, cos = projection(grads, exact)
    target = exact.norm().item()
    assert abs(mean - target) <= BAND * se, f"projection {mean:.4f} ± {se:.4f} vs exact {target:.4f}"
    assert se < 0.05 * target
    assert cos > 0.95, cos


@pytest.mark.parametrize("lam", [1.0, 0.0])
@pytest.mark.parametrize("kind", PATHS)
def test_rollout_step_baseline_matches_brute_force(tmp_path, kind, lam):
    """``step_baseline="rollouts"``: step k's baseline is the mean reward of fresh continuations of
    x_k, independent of the rollout's own x_{k+1} given x_k, so the mean gradient is still ∇E[R].
    At λ = 0 the outcome is replaced by the continuations' value of x_{k+1} (VinePPO's
    ``V̂(x_{k+1}) − V̂(x_k)``), whose mean given x_{k+1} is E[R | x_{k+1}]: unbiased too."""
    exact = exact_gradient(kind)
    grads = trainer_gradients(
        tmp_path, kind, 512, 12, estimator="top_k", step_baseline="rollouts", step_baseline_rollouts=2,
        step_baseline_lambda=lam,
    )
    mean, se, cos = projection(grads, exact)
    target = exact.norm().item()
    assert abs(mean - target) <= BAND * se, f"projection {mean:.4f} ± {se:.4f} vs exact {target:.4f}"
    assert se < 0.05 * target
    assert cos > 0.95, cos


class _LeakyBaseline(DFlowGRPOTrainer):
    """A deliberately invalid step baseline: step k's "prediction" is taken at x_{k+1} (the next
    step's argmax; the outcome itself at the last step), so it depends on the action it credits."""

    def _step_advantages(self, inputs, advantages):
        traj = self._flow_batch.trajectory
        traj.greedy = torch.cat([traj.greedy[:, 1:], traj.states[:, -1:]], dim=1)
        return super()._step_advantages(inputs, advantages)


class _LeakyContinuations(DFlowGRPOTrainer):
    """A deliberately invalid rollout baseline: step k's continuations start from the rollout's own
    x_{k+1} (still at t_k), so the value depends on the action it credits."""

    def _step_values(self, inputs, k):
        traj = self._flow_batch.trajectory
        states = traj.states
        traj.states = torch.cat([states[:, 1:], states[:, -1:]], dim=1)
        try:
            return super()._step_values(inputs, k)
        finally:
            traj.states = states


# The fitted c_k shrinks the leaky continuations' effect (about −23% of the gradient), hence 5 SE.
LEAKS = {
    "greedy": (_LeakyBaseline, dict(estimator="exact", step_baseline="greedy"), 512, 8, 2 * BAND),
    "rollouts": (_LeakyContinuations, dict(estimator="top_k", step_baseline="rollouts"), 1024, 16, BAND),
}


@pytest.mark.parametrize("leak", LEAKS)
def test_a_baseline_that_sees_the_action_is_caught_as_biased(tmp_path, monkeypatch, leak):
    trainer_class, config, batch, steps, band = LEAKS[leak]
    monkeypatch.setattr(f"{__name__}.DFlowGRPOTrainer", trainer_class)
    exact = exact_gradient("uniform")
    mean, se, _ = projection(trainer_gradients(tmp_path, "uniform", batch, steps, **config), exact)
    target = exact.norm().item()
    assert abs(mean - target) > band * se, f"projection {mean:.4f} ± {se:.4f} vs exact {target:.4f}"


@pytest.mark.parametrize("kind", PATHS)
def test_policy_gradient_on_a_power_time_grid_matches_brute_force(tmp_path, kind):
    """``flow_time_power=2`` (t_k = (k/K)²) stays unbiased. On this toy the grid barely changes
    ∇E[R] (cosine 0.996–0.997 with the uniform grid's), so a rollout/scoring grid mismatch is left
    to ``test_trainer.py::test_time_power_grid_is_used_by_rollouts_and_scoring`` (recorded times,
    first-pass ratio exactly 1)."""
    exact = exact_gradient(kind, 2.0)
    grads = trainer_gradients(tmp_path, kind, 512, 12, estimator="top_k", flow_time_power=2.0)
    mean, se, cos = projection(grads, exact)
    target = exact.norm().item()
    assert abs(mean - target) <= BAND * se, f"projection {mean:.4f} ± {se:.4f} vs exact {target:.4f}"
    assert se < 0.05 * target
    assert cos > 0.95, cos
