"""``DFlowGRPOConfig``: TRL's ``GRPOConfig`` plus the discrete-flow knobs."""

from __future__ import annotations

from dataclasses import dataclass, field

from trl import GRPOConfig

from ..likelihood import ESTIMATOR_CLASSES, ESTIMATORS

STEP_BASELINES = ("none", "greedy", "rollouts")


@dataclass
class DFlowGRPOConfig(GRPOConfig):
    r"""Configuration of :class:`DFlowGRPOTrainer` (dFlowGRPO, arXiv 2605.09291).

    Every ``GRPOConfig`` field keeps its meaning, with *denoising steps* in the place of
    completion tokens: the per-"token" log-probability is the per-step ``log π_θ(x_{k+1} | x_k)``
    aggregated over canvas positions, so ``importance_sampling_level``, ``loss_type``, ``epsilon``
    / ``epsilon_high``, ``beta`` (k3 KL) and ``scale_rewards`` act on steps. Defaults below follow
    the paper's code where it has them.

    Fields that do not apply to discrete flow models: ``max_completion_length`` (set to the number
    of trained steps by the trainer, so ``dr_grpo`` normalises by it), ``top_p``, ``top_k``,
    ``min_p``, ``repetition_penalty``, ``generation_kwargs``, ``cache_implementation``,
    ``mask_truncated_completions`` (refused when True) and everything ``vllm_*`` (refused:
    ``use_vllm=True``).

    Parameters:
        num_flow_steps: Euler steps K of training rollouts (paper: 8).
        num_flow_steps_eval: Euler steps of evaluation rollouts (paper: 20).
        estimator: ``"monte_carlo"`` (paper), ``"top_k"``, ``"exact"`` or ``"posterior_only"`` (d1).
        num_mc_samples: posterior draws n per position and step (paper: 24); also the tail draws of
            ``top_k``.
        top_k_size: exact head size k of the ``top_k`` estimator.
        train_steps: which steps are trained: ``"moving"`` (every step where tokens can move, the
            last one only with ``include_last_step``), or ``"all"``.
        include_last_step: train the final ``t_{K-1} → 1`` step (a pure posterior sample). The paper
            excludes it (steps 0..K-2 only); that biases the policy gradient, which then no longer
            ascends E[R] (tests/test_gradient_unbiased.py measures it against brute force), so the
            default trains it. ``False`` reproduces the paper's setting.
        rollout_branching: step-level credit. Each group of ``num_generations`` rollouts shares one
            trajectory ``x_0 .. x_k`` and branches at a trained step ``k`` drawn uniformly per
            group; only step ``k`` is trained, so the group's reward spread is what happened from
            ``x_k`` on and the group mean is a baseline conditioned on ``x_k``. Unbiased for the
            policy gradient up to the positive factor ``1/T`` (T trained steps), with one step's
            score terms per rollout instead of T; one backward step per rollout.
        shared_source: each group's rollouts start from one source draw ``x_0 ~ p_0`` (DanceGRPO's
            shared initial noise) and run independently from there; every trained step is still
            trained. ``x_0`` does not depend on θ and the rollouts are i.i.d. given it, so the group
            mean becomes a baseline conditioned on ``x_0`` and the gradient stays unbiased; it removes
            the share of the reward's variance that ``x_0`` decides
            (``benchmarks/reward_variance_by_step.py``).
        step_baseline: per-step baseline of the advantage. ``"none"``: every trained step of a
            rollout gets its GRPO advantage ``(R − mean_G R) / σ``. ``"greedy"``: step ``k`` gets
            ``(R − mean_G R − c_k (b_k − mean_G b_k)) / σ`` with ``b_k = R(argmax p^θ_{1|t_k}(· | x_k))``,
            the reward of the canvas the posterior at ``x_k`` predicts, and ``c_k ∈ [0, 1]`` fitted on
            earlier batches only. ``b_k`` is a function of ``x_k`` (and of the group's other
            rollouts), never of ``x_{k+1}``, so the policy gradient stays unbiased; late steps,
            whose prediction is close to the outcome, lose most of the noise that the outcome's
            other causes put on them. Costs one reward call per trained step. ``"rollouts"``: the
            same with ``b_k`` the mean reward of ``step_baseline_rollouts`` fresh continuations of
            ``x_k`` to ``t = 1`` (a Monte Carlo value of ``x_k``, as VinePPO estimates values for
            LLM steps). The continuations are independent of the rollout's own ``x_{k+1}`` given
            ``x_k``, so the gradient stays unbiased; unlike the prediction's reward, ``b_k`` aims
            at ``E[R | x_k]`` itself. Costs ``step_baseline_rollouts`` partial rollouts and reward
            calls per rollout and trained step (about ``M (K + 1) / 2`` times the rollout's
            forwards when every step is trained).
        step_baseline_rollouts: continuations per rollout and trained step (``M``) of
            ``step_baseline="rollouts"``.
        step_baseline_lambda: λ of a TD(λ) advantage on the step values (needs a ``step_baseline``).
            With ``v_k = c_k (b_k − mean_G b_k) / σ`` and ``v_K`` the GRPO advantage, step k gets
            ``Σ_{l ≥ k} λ^{l−k} (v_{l+1} − v_l)``. ``1`` (default) is ``v_K − v_k``, the unbiased
            baseline above; ``0`` credits step k with ``v_{k+1} − v_k``, how much its transition
            changed the value. On the greedy values that is the change of the predicted canvas's
            reward (per-step reward differences of predicted clean samples, as TempFlow-GRPO
            credits continuous-flow steps), and λ < 1 is **biased**: ``v_{k+1}`` depends on
            ``x_{k+1}``, so it is not a baseline, and the argmax prediction's reward is not
            ``E[R | x_{k+1}]``; it trades that bias for less noise (one reward call per denoising
            step). With ``step_baseline="rollouts"`` the values are Monte Carlo estimates of
            ``E[R | x_l]`` from continuations independent of the rollout's own future, so every λ
            is **unbiased** (VinePPO's advantage ``V̂(x_{k+1}) − V̂(x_k)`` at λ = 0); ``c_k`` is then
            fixed at 1, and the values of every step from the first trained one on are drawn.
        skip_zero_advantage: rollouts whose advantage is 0 at every trained step (groups whose rewards
            all tie, under TRL's ``(R − mean_G R) / σ``) are not re-scored in the loss. Their loss term
            is ``A · (…)`` with ``A = 0``, so the gradient is exactly the same; they get TRL's old
            log-probability (ratio 1) and the rollout's posterior entropy for the logs. Applies only
            when nothing else in the loss sees them: ``beta = 0``, ``entropy_coef = 0``, no adaptive
            entropy and ``top_entropy_quantile = 1``; otherwise every rollout is scored.
        ema_decay: keep an exponential moving average ``θ̄ ← d θ̄ + (1 − d) θ`` of the trained
            weights (the adapter's, with PEFT), updated every ``ema_update_interval`` optimizer
            steps; 0 (default) is off. When on, ``save_model`` and every checkpoint also write
            ``ema/`` (the averaged weights, loadable like the main ones) and ``evaluate`` runs with
            ``θ̄``. Flow-GRPO uses ``d = 0.9`` every 8 steps.
        ema_update_interval: optimizer steps between EMA updates.
        step_checkpointing: memory flat in the number of trained steps T (without it every step's
            graph, ``(B, D, V)`` log-posterior included, lives until TRL's single backward); gradients
            are unchanged. With token-level ratios (TRL's default; KL and clipping are per token too)
            each step is backpropagated right after its forward with ``∂L/∂ℓ`` read from TRL's loss
            at its value, at no extra compute (``trainer/step_backward.py``; with full fine-tuning
            it holds one more copy of the gradients). Where steps are coupled — sequence-level
            ratios, an entropy mask, adaptive entropy, VESPO, the off-policy mask — or under FSDP,
            ZeRO-3 or reentrant gradient checkpointing, each step's forward is recomputed during
            backward instead (one more forward per step).
        num_train_steps_per_rollout: train a random subset of this many steps per rollout (cuts the
            backward cost); ``None`` trains all selected steps.
        step_aggregation: per-step log-ratio over canvas positions: ``"mean"`` (geometric mean, the
            paper) or ``"sum"`` (the joint probability of the step).
        cfg_scale / cfg_scale_eval: classifier-free guidance ``w`` of training / evaluation rollouts
            (paper trains without CFG; FUDOKI evaluates with 5.0). Training with ``w ≠ 0`` scores the
            guided policy, at twice the forward cost.
        flow_time_power: the rollouts' time grid ``t_k = (k / K)^power``. 1 is uniform (FUDOKI's and
            the paper's); > 1 takes smaller steps near ``t = 0``, where a uniform-source canvas is
            still noise and the layout is decided (the shipped ShapeWorld base samples better at
            K = 8 with 3 than with 1: docs/shapeworld.md). Scoring uses the recorded times.
        flow_temperature: temperature τ of the rollout posterior (also used when scoring).
        rollout_batch_size: rollouts sampled per forward pass (default: per-device train batch size).
        log_sample_images: how many final images to log per generation (to TensorBoard / W&B /
            trackio when one is enabled in ``report_to``).
    """

    num_flow_steps: int = field(default=8, metadata={"help": "Euler steps of training rollouts (paper: 8)."})
    num_flow_steps_eval: int = field(
        default=20, metadata={"help": "Euler steps of evaluation rollouts (paper: 20)."}
    )
    estimator: str = field(
        default="monte_carlo",
        metadata={"help": "Estimator of log π_θ per step.", "choices": list(ESTIMATORS)},
    )
    num_mc_samples: int = field(
        default=24, metadata={"help": "Posterior draws per position and step (paper: 24)."}
    )
    top_k_size: int = field(default=16, metadata={"help": "Exact head size of the top_k estimator."})
    train_steps: str = field(
        default="moving", metadata={"help": "Which steps are trained.", "choices": ["moving", "all"]}
    )
    include_last_step: bool = field(
        default=True,
        metadata={"help": "Train the final direct-posterior step (paper: False, which biases the gradient)."},
    )
    rollout_branching: bool = field(
        default=False,
        metadata={
            "help": (
                "Groups share their trajectory up to a random step and branch there; "
                "only that step is trained."
            )
        },
    )
    shared_source: bool = field(
        default=False,
        metadata={
            "help": (
                "Each group's rollouts start from one x_0 ~ p_0, so the group mean is a baseline "
                "conditioned on x_0 (unbiased)."
            )
        },
    )
    step_baseline: str = field(
        default="none",
        metadata={
            "help": (
                "Per-step advantage baseline: none, greedy (reward of the posterior's argmax) or "
                "rollouts (mean reward of fresh continuations of x_k)."
            ),
            "choices": list(STEP_BASELINES),
        },
    )
    step_baseline_rollouts: int = field(
        default=2,
        metadata={"help": "Continuations per rollout and trained step of step_baseline='rollouts'."},
    )
    step_baseline_lambda: float = field(
        default=1.0,
        metadata={
            "help": "TD(λ) on the step values: 1 = baseline; < 1 = less noisy credit (biased if greedy)."
        },
    )
    skip_zero_advantage: bool = field(
        default=True,
        metadata={"help": "Do not re-score rollouts with zero advantage (same gradient, less compute)."},
    )
    ema_decay: float = field(
        default=0.0,
        metadata={"help": "EMA of the trained weights, θ̄ ← d θ̄ + (1 − d) θ (0: off; Flow-GRPO: 0.9)."},
    )
    ema_update_interval: int = field(
        default=1, metadata={"help": "Optimizer steps between EMA updates (Flow-GRPO: 8)."}
    )
    step_checkpointing: bool = field(
        default=False,
        metadata={
            "help": "Memory flat in trained steps: backpropagate each step at once (token-level ratios) "
            "or recompute its forward in backward."
        },
    )
    num_train_steps_per_rollout: int | None = field(
        default=None, metadata={"help": "Random subset of trained steps per rollout (None: all)."}
    )
    step_aggregation: str = field(
        default="mean", metadata={"help": "Aggregate per-position log ratios.", "choices": ["mean", "sum"]}
    )
    cfg_scale: float = field(default=0.0, metadata={"help": "CFG scale of training rollouts (paper: 0)."})
    cfg_scale_eval: float = field(default=0.0, metadata={"help": "CFG scale of evaluation rollouts."})
    flow_time_power: float = field(
        default=1.0,
        metadata={"help": "Time grid t_k = (k/K)^power of all rollouts (1: uniform, FUDOKI's)."},
    )
    flow_temperature: float = field(default=1.0, metadata={"help": "Temperature of the rollout posterior."})
    rollout_batch_size: int | None = field(
        default=None, metadata={"help": "Rollouts per sampler forward pass."}
    )
    log_sample_images: int = field(default=4, metadata={"help": "Final images logged per generation."})

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.ddp_find_unused_parameters is None:
            # A multimodal flow model runs one task's modules per run (a t2i DFM never uses its text
            # head): under DDP with gradient checkpointing, transformers would assume every parameter
            # is used and abort at the first backward.
            self.ddp_find_unused_parameters = True
        errors = []
        if self.num_flow_steps < 1 or self.num_flow_steps_eval < 1:
            errors.append("num_flow_steps and num_flow_steps_eval must be >= 1")
        if self.estimator not in ESTIMATORS:
            errors.append(f"estimator must be one of {', '.join(ESTIMATORS)}, got {self.estimator!r}")
        if self.num_mc_samples < 0 or (self.estimator == "monte_carlo" and self.num_mc_samples < 1):
            errors.append(f"num_mc_samples must be >= 1 for monte_carlo, got {self.num_mc_samples}")
        if self.top_k_size < 1:
            errors.append(f"top_k_size must be >= 1, got {self.top_k_size}")
        if self.train_steps not in ("moving", "all"):
            errors.append(f"train_steps must be 'moving' or 'all', got {self.train_steps!r}")
        if self.step_aggregation not in ("mean", "sum"):
            errors.append(f"step_aggregation must be 'mean' or 'sum', got {self.step_aggregation!r}")
        if self.step_baseline not in STEP_BASELINES:
            errors.append(
                f"step_baseline must be one of {', '.join(STEP_BASELINES)}, got {self.step_baseline!r}"
            )
        if self.step_baseline_rollouts < 1:
            errors.append(f"step_baseline_rollouts must be >= 1, got {self.step_baseline_rollouts}")
        per_step = self.estimator not in ESTIMATOR_CLASSES or ESTIMATOR_CLASSES[self.estimator].per_step
        if self.step_baseline != "none" and not per_step:
            errors.append(
                f"step_baseline needs per-step scores; {self.estimator} scores the final sample once: "
                "use another estimator"
            )
        if not 0.0 <= self.step_baseline_lambda <= 1.0:
            errors.append(f"step_baseline_lambda must be in [0, 1], got {self.step_baseline_lambda}")
        elif self.step_baseline_lambda != 1.0 and self.step_baseline == "none":
            errors.append(
                "step_baseline_lambda < 1 works on step values: set step_baseline='rollouts' (unbiased) "
                "or 'greedy'"
            )
        if self.step_baseline != "none" and self.multi_objective_aggregation != "sum_then_normalize":
            errors.append(
                "step_baseline works on summed rewards: set multi_objective_aggregation='sum_then_normalize'"
            )
        if self.num_train_steps_per_rollout is not None and self.num_train_steps_per_rollout < 1:
            errors.append("num_train_steps_per_rollout must be >= 1 or None")
        if self.rollout_branching and not per_step:
            errors.append(
                f"rollout_branching trains one denoising step; {self.estimator} scores none: "
                "use another estimator"
            )
        if self.rollout_branching and self.num_train_steps_per_rollout is not None:
            errors.append(
                "rollout_branching trains one step per rollout already: "
                "leave num_train_steps_per_rollout unset"
            )
        if self.rollout_branching and self.shared_source:
            errors.append(
                "rollout_branching already shares x_0 (and more) within a group: leave shared_source off"
            )
        if self.cfg_scale < 0 or self.cfg_scale_eval < 0:
            errors.append(
                "cfg_scale and cfg_scale_eval must be >= 0 (0: no guidance), "
                f"got {self.cfg_scale} and {self.cfg_scale_eval}"
            )
        if not 0.0 <= self.ema_decay < 1.0:
            errors.append(f"ema_decay must lie in [0, 1) (0: no EMA), got {self.ema_decay}")
        if self.ema_update_interval < 1:
            errors.append(f"ema_update_interval must be >= 1, got {self.ema_update_interval}")
        if not self.flow_time_power > 0:
            errors.append(f"flow_time_power must be > 0, got {self.flow_time_power}")
        if self.flow_temperature <= 0:
            errors.append(f"flow_temperature must be > 0, got {self.flow_temperature}")
        if self.mask_truncated_completions:
            errors.append(
                "mask_truncated_completions=True does not apply: a denoising trajectory has no EOS, so TRL "
                "would mark every sample truncated and train nothing; leave it False"
            )
        errors += _refused_grpo_fields(self)
        errors += _missing_trackers(self.report_to)
        if self.use_vllm:
            errors.append(
                "use_vllm=True is not supported: vLLM has no discrete-flow sampler; rollouts run in-process"
            )
        if self.num_generations is not None and self.num_generations < 2:
            errors.append(
                f"num_generations must be >= 2 for group-relative advantages, got {self.num_generations}"
            )
        if errors:
            raise ValueError("Invalid DFlowGRPOConfig: " + "; ".join(errors))


# GRPOConfig fields that steer autoregressive decoding: a rollout is a denoising trajectory, so
# they would be ignored without a word. (field, TRL's default, what to use instead)
_DECODING_FIELDS = (
    ("temperature", 1.0, "the rollout temperature is flow_temperature"),
    ("top_p", 1.0, "a rollout samples the full posterior"),
    ("top_k", 0, "a rollout samples the full posterior (top_k_size is the estimator's knob)"),
    ("min_p", None, "a rollout samples the full posterior"),
    ("repetition_penalty", 1.0, "a rollout has no token history to penalise"),
    ("generation_kwargs", None, "the sampler's knobs are the flow_* fields"),
    ("cache_implementation", None, "a denoising step has no KV cache"),
    ("use_transformers_continuous_batching", False, "rollouts run in-process with rollout_batch_size"),
    ("cast_lm_head_to_fp32", False, "the posterior is normalised in float32 already"),
)


def _refused_grpo_fields(cfg: DFlowGRPOConfig) -> list[str]:
    """One error per decoding field set away from TRL's default."""
    return [
        f"{name}={getattr(cfg, name)!r} does not apply to discrete-flow rollouts ({why}); "
        f"leave it at {default!r}"
        for name, default, why in _DECODING_FIELDS
        if getattr(cfg, name) != default
    ]


# report_to name -> the module its transformers callback imports (`tracking` installs the first three).
_TRACKER_MODULES = {
    "tensorboard": "tensorboard",
    "wandb": "wandb",
    "trackio": "trackio",
    "comet_ml": "comet_ml",
    "mlflow": "mlflow",
    "clearml": "clearml",
    "dvclive": "dvclive",
    "swanlab": "swanlab",
}


def _missing_trackers(report_to: list[str] | str | None) -> list[str]:
    """Trackers named in ``report_to`` whose package is absent (transformers would fail at the first
    log with a hint about PyTorch versions)."""
    import importlib.util

    names = [report_to] if isinstance(report_to, str) else list(report_to or [])
    missing = [
        n for n in names if n in _TRACKER_MODULES and importlib.util.find_spec(_TRACKER_MODULES[n]) is None
    ]
    if not missing:
        return []
    return [
        f"report_to={missing} needs {', '.join(_TRACKER_MODULES[n] for n in missing)} installed: "
        "pip install -e \".[tracking]\" (TensorBoard, W&B, trackio) or pip install the package, "
        "or set report_to='none'"
    ]
