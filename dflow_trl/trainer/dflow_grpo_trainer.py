"""``DFlowGRPOTrainer``: dFlowGRPO as a thin subclass of TRL's ``GRPOTrainer``.

Denoising steps play the role completion tokens play in TRL. The base class keeps everything it
owns — batching and buffering (``steps_per_generation`` × ``num_iterations``), reward calling and
weights, advantages and ``scale_rewards``, every loss type, ε/ε_high clipping, the k3 KL to the
reference (adapter disabled under PEFT), metrics, checkpoints and the model card. This class
overrides only:

* ``_generate`` — discrete-flow rollouts instead of ``model.generate``; the "completion" of a
  sample is the list of its trained steps, its decoded canvas the completion shown to rewards;
* ``_calculate_rewards`` — rewards see the final canvas tokens as ``completion_ids``;
* ``_generate_and_score_completions`` / ``compute_loss`` — carry the trajectory alongside TRL's
  batch (it is shuffled and split with it);
* ``_get_per_token_logps_and_entropies`` — per-step ``log π_θ(x_{k+1} | x_k)`` from fresh
  posterior logits, aggregated over canvas positions.
"""

from __future__ import annotations

import copy
import functools
import json
import os
import re
import warnings
from collections import defaultdict
from typing import Any

import torch
import torch.utils.checkpoint
from accelerate.utils import gather_object
from peft import PeftModel
from transformers import PreTrainedModel
from transformers.trainer import TRAINER_STATE_NAME
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR
from trl import GRPOTrainer
from trl.models import unwrap_model_for_generation
from trl.trainer.utils import nanstd

from ..likelihood import StepRecord, get_estimator
from ..models.base import FlowInputs, check_flow_model
from ..models.loading import load_flow_model, load_processing_class
from ..rewards import REWARD_REGISTRY, get_reward_function
from ..rewards.combine import checked_reward
from ..rollout import flow_log_posterior, rollout
from ..sampling import time_grid
from .config import DFlowGRPOConfig
from .ema import EMA_STATE_NAME, EMACallback, ParameterEMA
from .flow_batch import FlowBatch
from .model_card import flow_model_card
from .step_backward import StepGradients

_CITATION = """\
@article{wan2026dflowgrpo,
    title   = {{dFlowGRPO: Rate-Aware Policy Optimization for Discrete Flow Models}},
    author  = {Zhengyan Wan and Yidong Ouyang and Panwen Hu and Qiang Sun},
    year    = 2026,
    eprint  = {arXiv:2605.09291},
}"""


class DFlowGRPOTrainer(GRPOTrainer):
    """GRPO for discrete flow models (dFlowGRPO). Same constructor and workflow as ``GRPOTrainer``.

    ``model`` is a discrete flow model (``dflow_trl.models.DiscreteFlowModelMixin``) or the path of a
    saved one; ``processing_class`` its tokenizer (loaded from the path when omitted). Reward
    functions receive ``completions`` as PIL images (image canvases) or strings (text canvases),
    ``completion_ids`` as the final canvas tokens, and every dataset column as keyword arguments.
    """

    _tag_names = ["trl", "dflow-grpo", "discrete-flow-model"]
    _name = "dFlowGRPO"
    _paper = {
        "title": "dFlowGRPO: Rate-Aware Policy Optimization for Discrete Flow Models",
        "id": "2605.09291",
        "citation": _CITATION,
    }

    def __init__(
        self,
        model: str | PreTrainedModel | PeftModel,
        reward_funcs: Any = None,
        args: DFlowGRPOConfig | None = None,
        train_dataset: Any = None,
        eval_dataset: Any = None,
        processing_class: Any = None,
        *,
        quantization_config: Any = None,
        peft_config: Any = None,
        **kwargs: Any,
    ) -> None:
        """``GRPOTrainer``'s arguments. ``reward_processing_classes``, ``callbacks`` and ``optimizers``
        pass through ``kwargs`` unchanged; ``tools``, ``rollout_func`` and ``environment_factory``
        (autoregressive agents) are refused."""
        if args is None:
            args = DFlowGRPOConfig("dflow-grpo-output")
        if not isinstance(args, DFlowGRPOConfig):
            raise TypeError(
                f"args must be a DFlowGRPOConfig, got {type(args).__name__}; build one with the same fields"
            )
        agentic = [k for k in ("tools", "rollout_func", "environment_factory") if kwargs.pop(k, None)]
        if agentic:
            raise ValueError(
                f"{', '.join(agentic)}: not supported by DFlowGRPOTrainer (a rollout is a denoising "
                "trajectory, not an autoregressive agent loop)"
            )
        if isinstance(model, str):
            path = model
            model = load_flow_model(
                path, quantization_config=quantization_config, **(args.model_init_kwargs or {})
            )
            if processing_class is None:
                processing_class = load_processing_class(path)
        if processing_class is None:
            raise ValueError(
                "processing_class is required: pass the model's tokenizer "
                "(or give `model` as a path that holds it)"
            )
        check_flow_model(model)
        flow_model = model.get_base_model() if isinstance(model, PeftModel) else model
        for name, dataset in (("train_dataset", train_dataset), ("eval_dataset", eval_dataset)):
            _check_dataset(name, dataset)
        self.estimator = get_estimator(args.estimator, num_draws=args.num_mc_samples, top_k=args.top_k_size)
        self.estimator.check_path(flow_model.get_probability_path())
        if reward_funcs is None:
            raise ValueError("reward_funcs is required: pass one or more reward functions")
        funcs = reward_funcs if isinstance(reward_funcs, list) else [reward_funcs]
        funcs = [_resolve_reward(f) for f in funcs]
        funcs = [
            checked_reward(f) if callable(f) and not isinstance(f, torch.nn.Module) else f for f in funcs
        ]
        if peft_config is not None and getattr(peft_config, "task_type", None) is not None:
            # Task-typed PEFT wrappers (e.g. CAUSAL_LM) assume generate()/labels; a DFM needs the plain
            # wrapper.
            peft_config = copy.copy(peft_config)
            peft_config.task_type = None

        # TRL rebuilds the reference model from `config._name_or_path`, which fails for in-memory models:
        # build it here as a frozen copy instead (PEFT needs none: the adapter is disabled).
        beta, sync_ref = args.beta, args.sync_ref_model
        own_ref = beta != 0 and peft_config is None and not isinstance(model, PeftModel)
        ref_copy = copy.deepcopy(model).eval().requires_grad_(False) if own_ref else None
        if own_ref:
            args.beta, args.sync_ref_model = 0.0, False
        try:
            super().__init__(
                model=model,
                reward_funcs=funcs,
                args=args,
                train_dataset=train_dataset,
                eval_dataset=eval_dataset,
                processing_class=processing_class,
                quantization_config=quantization_config,
                peft_config=peft_config,
                **kwargs,
            )
        finally:
            args.beta, args.sync_ref_model = beta, sync_ref
        if own_ref:
            self.beta = beta
            self.ref_model = self.accelerator.prepare_model(ref_copy, evaluation_mode=True)
            if sync_ref:
                from trl.trainer.callbacks import SyncRefModelCallback

                self.add_callback(
                    SyncRefModelCallback(ref_model=self.ref_model, accelerator=self.accelerator)
                )

        self.ema = None
        if args.ema_decay > 0:
            self.ema = ParameterEMA(self.model, args.ema_decay, args.ema_update_interval)
            self.add_callback(EMACallback(self.ema))
        self.flow_path = flow_model.get_probability_path()
        # The batch in flight between TRL's calls into the overrides: built from the dataset rows before
        # TRL generates, completed by `_generate` and `_calculate_rewards`, rebuilt from TRL's buffer in
        # `compute_loss`; None in between.
        self._flow_batch: FlowBatch | None = None
        # TRL's batch dict while its loss runs, and the probe a nested evaluation of that loss reads
        # (step_checkpointing's step-by-step backward).
        self._loss_inputs: dict[str, Any] | None = None
        self._probe: torch.Tensor | None = None
        self._images_to_log: list[Any] = []
        self._baseline_stats: dict[int, list[float]] = {}
        # dr_grpo normalises by max_completion_length: here, the number of trained steps per rollout.
        self.max_completion_length = max(1, self._num_trained_steps(args.num_flow_steps))

    def train(self, resume_from_checkpoint: str | bool | None = None, *args: Any, **kwargs: Any) -> Any:
        """``Trainer.train``; ``resume_from_checkpoint=True`` resumes from the newest *complete*
        ``checkpoint-N`` in ``output_dir`` (a run killed while saving leaves an incomplete newest one,
        which ``Trainer`` would pick and fail on), and a given checkpoint folder is checked first."""
        if resume_from_checkpoint is True or (
            isinstance(resume_from_checkpoint, str) and resume_from_checkpoint.lower() in ("true", "latest")
        ):
            resume_from_checkpoint = last_complete_checkpoint(self.args.output_dir)
        elif isinstance(resume_from_checkpoint, str) and not _is_complete_checkpoint(resume_from_checkpoint):
            raise ValueError(
                f"{resume_from_checkpoint} is not a complete checkpoint (no readable {TRAINER_STATE_NAME}, "
                "which is written last): it was probably interrupted while saving; resume from an earlier "
                "one, or pass resume_from_checkpoint=True to pick the newest complete one"
            )
        if self.ema is not None and isinstance(resume_from_checkpoint, str):
            if not os.path.isfile(os.path.join(resume_from_checkpoint, EMA_STATE_NAME)):
                raise ValueError(
                    f"{resume_from_checkpoint} holds no {EMA_STATE_NAME}: it was saved without EMA, so "
                    "ema_decay > 0 cannot resume it exactly; resume with ema_decay=0 or start a new run"
                )
            self.ema.load(resume_from_checkpoint)
        return super().train(resume_from_checkpoint, *args, **kwargs)

    # ---- EMA --------------------------------------------------------------------------------------
    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        """``Trainer._save``; with EMA on, also the averaged weights in ``output_dir/ema`` (loadable
        like the main ones) and their fp32 state for resuming."""
        super()._save(output_dir, state_dict)
        if self.ema is None or not self.args.should_save:
            return
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        with self.ema.applied():
            super()._save(os.path.join(output_dir, "ema"))
        self.ema.save(output_dir)

    def evaluate(self, *args: Any, **kwargs: Any) -> dict[str, float]:
        """``Trainer.evaluate``, with the EMA weights when ``ema_decay > 0``."""
        if self.ema is None:
            return super().evaluate(*args, **kwargs)
        with self.ema.applied():
            return super().evaluate(*args, **kwargs)

    # ---- steps ------------------------------------------------------------------------------------
    def _flow_model(self) -> Any:
        model = self.accelerator.unwrap_model(self.model)
        return model.get_base_model() if isinstance(model, PeftModel) else model

    def _trainable_steps(self, num_steps: int) -> list[int]:
        """Steps whose probability depends on θ and that the config trains."""
        times = time_grid(num_steps, power=self.args.flow_time_power).tolist()
        steps = []
        for k in range(num_steps):
            last = k == num_steps - 1
            if last and not self.args.include_last_step and num_steps > 1:
                continue
            if self.args.train_steps == "all" or self.flow_path.moves_at(times[k], times[k + 1] - times[k]):
                steps.append(k)
        if not steps:
            raise ValueError(
                f"no trainable denoising step among {num_steps}: "
                "raise num_flow_steps or set include_last_step=True"
            )
        return self.estimator.scored_steps(steps)

    def _num_trained_steps(self, num_steps: int) -> int:
        if self.args.rollout_branching:
            return 1
        n = len(self._trainable_steps(num_steps))
        return min(n, self.args.num_train_steps_per_rollout or n)

    # ---- rollouts ---------------------------------------------------------------------------------
    def _generate_and_score_completions(self, inputs: list[dict[str, Any]]) -> dict[str, Any]:
        columns = {k: [r[k] for r in inputs] for k in inputs[0] if k != "prompt"}
        prompts = [r["prompt"] for r in inputs]
        flow_inputs = self._flow_model().prepare_flow_inputs(prompts, self.processing_class, **columns)
        self._flow_batch = FlowBatch(flow_inputs)
        try:
            output = super()._generate_and_score_completions(inputs)
            if self.args.step_baseline != "none" and self.model.training:
                output["advantages"] = self._step_advantages(inputs, output["advantages"])
            output.update(self._flow_batch.to_dict())
        finally:
            self._flow_batch = None
        return output

    def _generate(self, prompts: list[Any]):
        mode = "train" if self.model.training else "eval"
        args = self.args
        flow_model = self._flow_model()
        flow = self._flow_batch
        batch = flow.inputs
        if batch.batch_size != len(prompts):
            raise RuntimeError("DFlowGRPOTrainer: prompts differ from the batch (internal error)")
        num_steps = args.num_flow_steps if mode == "train" else args.num_flow_steps_eval
        cfg = args.cfg_scale if mode == "train" else args.cfg_scale_eval
        # Evaluation scores the policy on independent rollouts; branching is a training-time estimator.
        branching = args.rollout_branching and mode == "train"
        branch = self._branch_steps(prompts, num_steps, batch.input_ids.device) if branching else None
        if args.shared_source and mode == "train":
            # Branching at step 0 shares x_0 only: x_1 onwards is drawn per rollout.
            self._check_whole_groups(prompts, "shared_source")
            branch = torch.zeros(len(prompts), dtype=torch.long, device=batch.input_ids.device)
        with unwrap_model_for_generation(
            self.model_wrapped, self.accelerator, gather_deepspeed3_params=args.ds3_gather_for_generation
        ) as unwrapped:
            traj = rollout(
                unwrapped,
                batch,
                self.flow_path,
                num_steps,
                cfg_scale=cfg,
                temperature=args.flow_temperature,
                estimator=self.estimator,
                chunk_size=args.rollout_batch_size or args.per_device_train_batch_size,
                branch_steps=branch,
                group_size=self.num_generations,
                record_greedy=args.step_baseline == "greedy" and mode == "train",
                time_power=args.flow_time_power,
                # The logs' entropy of rollouts the loss does not re-score (skip_zero_advantage).
                record_entropy=args.skip_zero_advantage and mode == "train",
            )
        completions = flow_model.decode_canvas(traj.final, self.processing_class)
        if branching:
            step_index = branch.unsqueeze(1)
        else:
            step_index = self._select_steps(batch.batch_size, num_steps, traj.states.device)
        flow.trajectory, flow.step_index, flow.cfg_scale = traj, step_index, float(cfg)
        changed = (traj.states[:, 1:] != traj.states[:, :-1]).float().mean(dim=(0, 2))
        for k, frac in enumerate(changed.tolist()):
            self._metrics[mode][f"flow/changed_frac/step_{k}"].append(frac)
        if flow_model.canvas_kind == "image" and args.log_sample_images:
            self._images_to_log = list(completions[: args.log_sample_images])
        cond = (batch.attention_mask.bool() & ~batch.canvas_mask).cpu()
        prompt_ids = [row[m].tolist() for row, m in zip(batch.input_ids.cpu(), cond)]
        return prompt_ids, step_index.tolist(), None, completions, None, {}, None, None

    def _select_steps(self, batch_size: int, num_steps: int, device: torch.device) -> torch.Tensor:
        steps = torch.tensor(self._trainable_steps(num_steps), device=device)
        keep = self.args.num_train_steps_per_rollout
        if not keep or keep >= steps.numel():
            return steps.expand(batch_size, -1).clone()
        order = torch.rand(batch_size, steps.numel(), device=device).argsort(-1)[:, :keep].sort(-1).values
        return steps[order]

    def _branch_steps(self, prompts: list[Any], num_steps: int, device: torch.device) -> torch.Tensor:
        """One trained step per group, uniformly at random, repeated for the group's rows."""
        self._check_whole_groups(prompts, "rollout_branching")
        g = self.num_generations
        steps = torch.tensor(self._trainable_steps(num_steps), device=device)
        pick = torch.randint(0, steps.numel(), (len(prompts) // g,), device=device)
        return steps[pick].repeat_interleave(g)

    def _check_whole_groups(self, prompts: list[Any], option: str) -> None:
        g = self.num_generations
        if len(prompts) % g or any(prompts[i] != prompts[i - i % g] for i in range(len(prompts))):
            raise ValueError(
                f"{option} needs each process's batch to hold whole groups of {g} rollouts of one prompt; "
                "make per_device_train_batch_size a multiple of num_generations"
            )

    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
        flow = self._flow_batch
        canvas = flow.trajectory.final.tolist()
        flow.rewards = super()._calculate_rewards(inputs, prompts, completions, canvas)
        if bool(torch.isnan(flow.rewards).all()):
            # TRL zeroes such advantages: the step trains nothing, which would otherwise pass unnoticed.
            warnings.warn(
                f"every reward function returned None for all {flow.rewards.shape[0]} samples of this "
                "batch: the step carries no learning signal (check the rewards' inputs, e.g. dataset columns "
                "they need)",
                stacklevel=2,
            )
        return flow.rewards

    # ---- per-step baselines -----------------------------------------------------------------------
    _BASELINE_DECAY = 0.8

    def _baseline_coef(self, k: int, advantages: torch.Tensor, shift: torch.Tensor) -> float:
        """The control-variate coefficient ``c_k ∈ [0, 1]`` for step ``k``: ``Σ A·s / Σ s²`` (the least-
        squares fit of the advantages by the baseline), from *earlier* generation batches only, so
        that ``c_k`` is fixed given the past and the baseline stays a function of ``x_k``. 1 until a
        batch has been seen; then updated with this batch (exponential decay 0.8)."""
        stats = self._baseline_stats.setdefault(k, [0.0, 0.0])
        coef = 1.0 if stats[1] == 0 else min(1.0, max(0.0, stats[0] / stats[1]))
        decay = self._BASELINE_DECAY
        stats[0] = decay * stats[0] + (advantages * shift).sum().item()
        stats[1] = decay * stats[1] + shift.pow(2).sum().item()
        return coef

    def _summed(self, rewards_per_func: torch.Tensor) -> torch.Tensor:
        """TRL's weighted sum over reward functions, NaN where every function returned None."""
        summed = (rewards_per_func * self.reward_weights.to(rewards_per_func.device)).nansum(dim=1)
        return summed.masked_fill(torch.isnan(rewards_per_func).all(dim=1), torch.nan)

    def _step_advantages(self, inputs: list[dict[str, Any]], advantages: torch.Tensor) -> torch.Tensor:
        """``(B, T)`` advantages: TRL's ``(R − μ_G) / σ`` minus, for step ``k``, ``(b_k − mean_G b_k) / σ``
        with ``b_k`` the reward of ``Trajectory.greedy[:, k]`` or the mean reward of fresh
        continuations of ``x_k`` (``DFlowGRPOConfig.step_baseline``, :meth:`_step_values`), or with
        ``step_baseline_lambda < 1`` the TD(λ) sum of those values' differences (:func:`_td_lambda`).

        σ is recomputed from TRL's rewards and checked against TRL's advantages, so a change of
        TRL's normalisation fails here instead of silently mixing two scales."""
        flow, g = self._flow_batch, self.num_generations
        step_index = flow.step_index
        prompts = [r["prompt"] for r in inputs]
        rewards = self._summed(flow.rewards)
        spread = torch.ones_like(rewards)
        if self.scale_rewards == "group":
            spread = nanstd(rewards.view(-1, g), dim=1).repeat_interleave(g)
        elif self.scale_rewards == "batch":
            spread = nanstd(rewards).expand_as(rewards)
        sigma = spread + 1e-4 if self.scale_rewards != "none" else spread
        rank = self.accelerator.process_index
        local = slice(rank * len(prompts), (rank + 1) * len(prompts))
        mean = torch.nanmean(rewards.view(-1, g), dim=1).repeat_interleave(g)
        full = ((rewards - mean) / sigma).nan_to_num(0.0)
        if not torch.allclose(full[local], advantages, atol=1e-5, rtol=1e-4):
            raise RuntimeError(
                "step_baseline: TRL's advantages no longer equal (R − group mean) / σ; the installed TRL "
                "changed its normalisation: use the TRL version pyproject.toml pins"
            )
        # Where TRL's σ is 0 the group carries no reward signal and TRL trains nothing on it; a baseline
        # shift divided by σ + 1e-4 would only add (huge) zero-mean noise there.
        silent = torch.isclose(spread, torch.zeros_like(spread)) | torch.isnan(rewards)
        lam = self.args.step_baseline_lambda
        num_steps = flow.trajectory.num_steps
        # TD(λ) needs the values of every step after the first trained one; λ = 1 only the trained ones.
        steps = range(int(step_index.min()), num_steps) if lam < 1 else step_index.unique().tolist()
        values: dict[int, torch.Tensor] = {}
        for k in steps:
            base = self._step_values(inputs, k)
            centred = base - torch.nanmean(base.view(-1, g), dim=1).repeat_interleave(g)
            shift = (centred / sigma).nan_to_num(0.0).masked_fill(silent, 0.0)
            coef = self._baseline_coef(k, full, shift)
            if lam < 1 and self.args.step_baseline == "rollouts":
                # v_{k+1} then stands in for the outcome itself: unbiased only at its own scale.
                coef = 1.0
            values[k] = coef * shift
            metrics = self._metrics["train"]
            metrics[f"flow/baseline_coef/step_{k}"].append(coef)
            metrics[f"flow/baseline_reward/step_{k}"].append(torch.nanmean(base).item())
            if full.pow(2).sum() > 0:  # share of the advantages' second moment removed (< 0: added)
                metrics[f"flow/baseline_explained/step_{k}"].append(
                    1.0 - ((full - coef * shift).pow(2).sum() / full.pow(2).sum()).item()
                )
        out = torch.empty(step_index.shape, device=advantages.device)
        for k in step_index.unique().tolist():
            credit = _td_lambda(values, full, k, num_steps, lam)
            hit = step_index == k
            out[hit] = credit[local].unsqueeze(1).expand_as(out)[hit]
        return out

    def _step_values(self, inputs: list[dict[str, Any]], k: int) -> torch.Tensor:
        """``b_k`` for every rollout of the gathered batch (``(P · B,)``, NaN where no reward function
        scored): the reward of the posterior's argmax at ``x_k`` (``"greedy"``), or the mean reward
        of ``M = step_baseline_rollouts`` continuations of ``x_k`` drawn afresh from ``t_k``
        (``"rollouts"``), which are independent of the rollout's own ``x_{k+1}`` given ``x_k``."""
        flow, args = self._flow_batch, self.args
        flow_model = self._flow_model()
        if args.step_baseline == "greedy":
            rows, canvas = list(range(len(inputs))), flow.trajectory.greedy[:, k]
        else:
            m = args.step_baseline_rollouts
            rows = [i for i in range(len(inputs)) for _ in range(m)]
            index = torch.tensor(rows, device=flow.trajectory.states.device)
            with unwrap_model_for_generation(
                self.model_wrapped, self.accelerator, gather_deepspeed3_params=args.ds3_gather_for_generation
            ) as unwrapped:
                canvas = rollout(
                    unwrapped,
                    flow.inputs.index(index),
                    self.flow_path,
                    flow.trajectory.num_steps,
                    cfg_scale=flow.cfg_scale,
                    temperature=args.flow_temperature,
                    chunk_size=args.rollout_batch_size or args.per_device_train_batch_size,
                    time_power=args.flow_time_power,
                    start=(k, flow.trajectory.states[index, k]),
                ).final
        completions = flow_model.decode_canvas(canvas, self.processing_class)
        picked = [inputs[i] for i in rows]
        scored = super()._calculate_rewards(
            picked, [r["prompt"] for r in picked], completions, canvas.tolist()
        )
        values = self._summed(scored)
        if args.step_baseline == "rollouts":
            # Gathered rows are process-major, each process's M continuations of a rollout adjacent.
            values = values.view(-1, args.step_baseline_rollouts).nanmean(dim=1)
        return values

    # ---- log-probabilities ------------------------------------------------------------------------
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        flow = FlowBatch.from_dict(inputs)
        flow.skip = self._zero_advantage_rows(flow, inputs.get("advantages"))
        if flow.skip is not None:
            # A = 0: the loss term is 0 whatever the log-probability, so those rows keep TRL's old one
            # (ratio 1), or 0 when TRL keeps none.
            flow.skip_log_probs = inputs.get("old_per_token_logps")
        self._flow_batch, self._loss_inputs = flow, inputs
        try:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        finally:
            self._flow_batch, self._loss_inputs = None, None

    def _get_per_token_logps_and_entropies(
        self, model, input_ids, attention_mask, logits_to_keep, batch_size=None, compute_entropy=False,
        compute_aux_loss=False, **_: Any,
    ):
        """Per-step ``log π̂_θ(x_{k+1} | x_k)`` (``(B, T)``, aggregated over the canvas) for the trained
        steps."""
        if self._probe is not None:
            return self._probe, torch.zeros_like(self._probe), None
        flow = self._flow_batch
        if flow is None or flow.trajectory is None or flow.batch_size != input_ids.shape[0]:
            raise RuntimeError("DFlowGRPOTrainer: no trajectory matches this batch (internal error)")
        traj, step_index, cfg = flow.trajectory, flow.step_index, flow.cfg_scale
        times = traj.times
        b, t_steps = step_index.shape
        logps = torch.zeros(b, logits_to_keep, device=traj.states.device)
        entropies = torch.zeros_like(logps)
        chunk = batch_size or self.args.per_device_train_batch_size
        mode = "train" if self.model.training else "eval"
        skip = flow.skip if torch.is_grad_enabled() else None
        if skip is not None and skip.any():
            old = flow.skip_log_probs
            logps[skip] = old[skip, : logps.shape[1]].detach() if old is not None else 0.0
            if compute_entropy:
                entropies[skip, :t_steps] = traj.entropy[skip].gather(1, step_index[skip]).to(entropies.dtype)
        if skip is not None:
            self._metrics[mode]["flow/skipped_frac"].append(skip.float().mean().item())
        store = (
            self._step_gradients(model, logps)
            if self.args.step_checkpointing and torch.is_grad_enabled()
            else None
        )
        for k in step_index.unique().tolist():
            sel = (step_index == k).nonzero()
            if skip is not None:
                sel = sel[~skip[sel[:, 0]]]
            for s in range(0, sel.shape[0], chunk):
                i, j = sel[s : s + chunk, 0], sel[s : s + chunk, 1]
                rows = flow.index(i)
                record, t_in = self.estimator.scored_record(rows.trajectory, k)
                batch = rows.inputs
                t, h = float(times[k]), float(times[k + 1] - times[k])
                t_in = t if t_in is None else t_in
                score = functools.partial(
                    self._score_step, model, batch, record, t, h, t_in, cfg, compute_entropy
                )
                if store is not None:
                    agg, ent = score()
                    store.add(agg, i, j)
                    agg = agg.detach()
                elif self.args.step_checkpointing and torch.is_grad_enabled():
                    # Keep only this step's (B,) log-probability for the loss; its forward is recomputed
                    # during backward, so memory does not grow with the number of trained steps.
                    agg, ent = torch.utils.checkpoint.checkpoint(score, use_reentrant=False)
                else:
                    agg, ent = score()
                logps[i, j] = agg
                if compute_entropy:
                    entropies[i, j] = ent
                if torch.is_grad_enabled() and record.old_log_prob is not None:
                    old = (
                        record.old_log_prob.mean(-1)
                        if self.args.step_aggregation == "mean"
                        else record.old_log_prob.sum(-1)
                    )
                    drift = (agg.detach() - old).abs().mean().item()
                    self._metrics[mode][f"flow/abs_log_ratio/step_{k}"].append(drift)
        if not torch.isfinite(logps[:, :t_steps]).all():
            raise FloatingPointError(
                "non-finite step log-probability: "
                "the posterior gave zero probability to a realised transition; "
                "check that the model's logits are finite and that temperature/CFG match the rollouts"
            )
        if store is not None:
            logps = store.attach(logps)
        return logps, (entropies if compute_entropy else None), None

    def _shards_parameters(self) -> bool:
        """FSDP or DeepSpeed ZeRO-3, whose parameters are gathered only around each forward."""
        if getattr(self, "is_fsdp_enabled", False):
            return True
        plugin = getattr(self.accelerator.state, "deepspeed_plugin", None)
        return bool(getattr(self, "is_deepspeed_enabled", False) and plugin and plugin.zero_stage == 3)

    def _step_gradients(self, model: Any, logps: torch.Tensor) -> StepGradients | None:
        """Step-by-step backward for ``step_checkpointing`` where TRL's ``∂L/∂ℓ_{b,j}`` depends on
        ``ℓ_{b,j}`` alone (token-level ratios, no entropy mask or other cross-step term), read from
        TRL's own loss at a probe; None where each step's forward is recomputed in backward instead."""
        args, inputs = self.args, self._loss_inputs
        reentrant = args.gradient_checkpointing and (args.gradient_checkpointing_kwargs or {}).get(
            "use_reentrant"
        )
        if (
            inputs is None
            or self.importance_sampling_level != "token"
            or self.loss_type == "vespo"  # sequence-level weights
            or self.off_policy_mask_threshold is not None  # a sequence-level mask
            or self.top_entropy_quantile < 1
            or args.use_adaptive_entropy
            or reentrant  # reentrant checkpoints cannot take torch.autograd.grad
            or self._shards_parameters()  # the gradients would be taken of shards, not of what ran
        ):
            return None
        values = logps.detach().clone()
        old = inputs.get("old_per_token_logps")
        if old is not None:
            # Ratio 1 where a step is not yet known: finite, whatever the loss.
            values = old[:, : values.shape[1]].detach().clone().to(values.dtype)
        params = [p for p in model.parameters() if p.requires_grad]
        return StepGradients(params, functools.partial(self._loss_gradient_at, model, inputs), values)

    def _loss_gradient_at(self, model: Any, inputs: dict[str, Any], values: torch.Tensor) -> torch.Tensor:
        """``∂L/∂ℓ`` of TRL's loss at ``ℓ = values``. TRL's loss logs metrics and gathers them; here
        they go to a scratch buffer and the collectives act locally, since ranks may probe a different
        number of times."""
        probe = values.detach().clone().requires_grad_(True)
        acc, collectives = self.accelerator, ("gather", "gather_for_metrics", "reduce")
        shadowed = {name: acc.__dict__[name] for name in collectives if name in acc.__dict__}
        metrics, self._metrics = self._metrics, {"train": defaultdict(list), "eval": defaultdict(list)}
        self._probe = probe
        for name in collectives:
            setattr(acc, name, lambda t, *a, **k: t)
        try:
            loss = GRPOTrainer._compute_loss(self, model, inputs)
        finally:
            self._probe, self._metrics = None, metrics
            for name in collectives:
                acc.__dict__.pop(name, None)
            acc.__dict__.update(shadowed)
        (grad,) = torch.autograd.grad(loss, probe, allow_unused=True)
        return torch.zeros_like(probe) if grad is None else grad

    def _zero_advantage_rows(self, flow: FlowBatch, advantages: torch.Tensor | None) -> torch.Tensor | None:
        """``(B,)`` rows whose advantages are 0 at every step, when no loss term but ``A · (…)`` sees
        them (``DFlowGRPOConfig.skip_zero_advantage``); ``None`` when every row must be scored."""
        args = self.args
        if not args.skip_zero_advantage or flow.trajectory.entropy is None or advantages is None:
            return None
        if (
            self.beta != 0
            or args.entropy_coef != 0
            or args.use_adaptive_entropy
            or args.top_entropy_quantile < 1
        ):
            return None
        adv = advantages
        skip = (adv == 0).all(-1) if adv.dim() == 2 else adv == 0
        # Score one row even then: the loss needs a graph, and under DDP every rank must run the model.
        skip[0] = False
        return skip

    def _score_step(
        self, model: Any, batch: FlowInputs, record: StepRecord, t: float, h: float, t_in: float, cfg: float,
        compute_entropy: bool,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``log π̂_θ(x_{k+1} | x_k)`` of one step aggregated over the canvas (``(B,)``), and the mean
        posterior entropy (``(B,)``, no gradient) when asked."""
        log_post = flow_log_posterior(model, batch, record.x_t, t_in, cfg, self.args.flow_temperature)
        per_pos = self.estimator.step_log_prob(self.flow_path, record, log_post, t, h).float()
        agg = per_pos.mean(-1) if self.args.step_aggregation == "mean" else per_pos.sum(-1)
        ent = None
        if compute_entropy:
            with torch.no_grad():
                ent = -(log_post.exp() * log_post.nan_to_num(neginf=0.0)).sum(-1).mean(-1)
        return agg, ent

    # ---- logging ----------------------------------------------------------------------------------
    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if self.log_completions:
            _images_as_completion_images(self._logs)
        super().log(logs, start_time)
        if self._images_to_log:
            # A collective: every rank holds images here (same config) and must join, or rank 0 hangs.
            images = gather_object(self._images_to_log)
            self._images_to_log = []
            if self.accelerator.is_main_process:
                _log_images(self, images[: self.args.log_sample_images])

    def create_model_card(
        self,
        model_name: str | None = None,
        dataset_name: str | None = None,
        tags: str | list[str] | None = None,
    ) -> None:
        """Write ``README.md`` in ``output_dir``: the base model, the flow settings and a quick start
        that loads this policy onto its DFM and samples (TRL's card is a text-generation pipeline)."""
        if not self.is_world_process_zero():
            return
        tags = [tags] if isinstance(tags, str) else list(tags or [])
        card = flow_model_card(self, model_name=model_name, dataset_name=dataset_name, tags=tags)
        card.save(os.path.join(self.args.output_dir, "README.md"))


def _td_lambda(
    values: dict[int, torch.Tensor], final: torch.Tensor, k: int, num_steps: int, lam: float
) -> torch.Tensor:
    """``Σ_{l=k}^{K−1} λ^{l−k} (v_{l+1} − v_l)`` with ``v_K = final`` (``final − v_k`` at λ = 1)."""
    if lam == 1.0:
        return final - values[k]
    v = [values[step] for step in range(k, num_steps)] + [final]
    return sum(lam**i * (v[i + 1] - v[i]) for i in range(len(v) - 1))


def _images_as_completion_images(logs: dict[str, Any]) -> None:
    """Image completions in TRL's ``log_completions`` buffers become the row's image (which W&B and
    trackio show) and a ``<image W×H>`` text: TRL writes the completions table to parquet, which
    holds no PIL image, and prints it as text."""
    completions = logs["completion"]
    if all(isinstance(c, str | list) for c in completions):
        return
    images = [[] if isinstance(c, str | list) else [c] for c in completions]
    texts = [c if isinstance(c, str | list) else f"<image {c.size[0]}×{c.size[1]}>" for c in completions]
    logs["images"].clear()
    logs["images"].extend(images)
    completions.clear()
    completions.extend(texts)


def _resolve_reward(func: Any) -> Any:
    """A registry name or ``"pkg.module:func"`` is ours to resolve; TRL would take any string as a Hub
    reward-model id and try the network. Other strings (Hub ids, local model folders) go to TRL."""
    if isinstance(func, str) and (func in REWARD_REGISTRY or ":" in func):
        return get_reward_function(func)
    return func


def _is_complete_checkpoint(folder: str | os.PathLike) -> bool:
    """``Trainer`` writes ``trainer_state.json`` after the weights, optimizer and RNG state."""
    try:
        with open(os.path.join(folder, TRAINER_STATE_NAME)) as f:
            json.load(f)
    except (OSError, ValueError):
        return False
    return True


def last_complete_checkpoint(output_dir: str | os.PathLike) -> str:
    """The newest ``checkpoint-N`` folder of ``output_dir`` whose save finished; warns about newer,
    incomplete ones it skips."""
    found = []
    if os.path.isdir(output_dir):
        for name in os.listdir(output_dir):
            match = re.fullmatch(rf"{PREFIX_CHECKPOINT_DIR}-(\d+)", name)
            if match and os.path.isdir(os.path.join(output_dir, name)):
                found.append((int(match.group(1)), os.path.join(output_dir, name)))
    skipped = []
    for _, folder in sorted(found, reverse=True):
        if _is_complete_checkpoint(folder):
            if skipped:
                warnings.warn(
                    f"skipping incomplete checkpoint(s) {skipped} (interrupted while saving); "
                    f"resuming from {folder}",
                    stacklevel=3,
                )
            return folder
        skipped.append(os.path.basename(folder))
    detail = (
        f" (incomplete: {skipped}; a save is complete once {TRAINER_STATE_NAME} is written)"
        if skipped
        else ""
    )
    raise ValueError(f"no complete checkpoint in {output_dir} to resume from{detail}")


def _check_dataset(name: str, dataset: Any) -> None:
    if dataset is None:
        return
    datasets = dataset.values() if isinstance(dataset, dict) else [dataset]
    for ds in datasets:
        if hasattr(ds, "__len__") and len(ds) == 0:
            raise ValueError(f"{name} is empty: there is nothing to train or evaluate on")
        cols = getattr(ds, "column_names", None)
        if cols is None:
            continue
        if "prompt" not in cols:
            raise ValueError(f"{name} needs a 'prompt' column (the condition text); it has columns {cols}")
        clash = [c for c in ("image", "images") if c in cols]
        if clash:
            raise ValueError(
                f"{name} has a column named {clash[0]!r}, "
                "which TRL treats as chat images for a VLM processor; "
                "rename it (e.g. to 'scene_tokens' or 'image_path') and point the model's image column at it"
            )


def _log_images(trainer: DFlowGRPOTrainer, images: list[Any]) -> None:
    """Send final sample images to the trackers named in ``report_to`` that are installed."""
    step = trainer.state.global_step
    report = trainer.args.report_to or []
    if "tensorboard" in report:
        import numpy as np

        for cb in trainer.callback_handler.callbacks:
            writer = getattr(cb, "tb_writer", None)
            if writer is not None:
                for n, img in enumerate(images):
                    writer.add_image(f"samples/{n}", np.asarray(img), step, dataformats="HWC")
    if "wandb" in report:
        try:
            import wandb

            if wandb.run is not None:
                wandb.log({"samples": [wandb.Image(img) for img in images]}, step=step)
        except ImportError:
            pass
    if "trackio" in report:
        try:
            import trackio

            trackio.log({"samples": [trackio.Image(img) for img in images]}, step=step)
        except (ImportError, AttributeError, RuntimeError):
            pass


__all__ = ["DFlowGRPOTrainer"]
