"""Model-level rollouts: a discrete flow model and a batch of prompts → a :class:`Trajectory`."""

from __future__ import annotations

from typing import Any

import torch

from .likelihood import Estimator
from .models.base import FlowInputs
from .paths.base import ProbabilityPath
from .sampling import Trajectory, guided_log_probs, sample_trajectory, time_grid


def wants_flow_time(model: Any) -> bool:
    """Whether ``model`` (possibly wrapped by DDP or PEFT) is time-conditioned."""
    inner = getattr(model, "module", model)
    inner = inner.get_base_model() if hasattr(inner, "get_base_model") else inner
    return bool(getattr(inner, "wants_flow_time", False))


def flow_logits(
    model: Any,
    batch: FlowInputs,
    canvas: torch.LongTensor,
    unconditional: bool = False,
    t: float | None = None,
) -> torch.Tensor:
    """``(B, D, V)`` posterior logits of ``model`` (called through its ``forward``, so DDP/PEFT wrappers
    see the call) for ``batch`` with the canvas set to ``canvas``; time-conditioned models get ``t``."""
    ids = batch.with_canvas(canvas, unconditional=unconditional)
    extra = dict(batch.extra)
    if wants_flow_time(model):
        extra["flow_time"] = t
    return model(input_ids=ids, attention_mask=batch.attention_mask, canvas_mask=batch.canvas_mask, **extra)


def flow_log_posterior(
    model: Any,
    batch: FlowInputs,
    canvas: torch.LongTensor,
    t: float,
    cfg_scale: float = 0.0,
    temperature: float = 1.0,
    batch_cfg: bool = True,
) -> torch.Tensor:
    """``(B, D, V)`` log-probabilities of the policy's posterior at ``canvas``:
    ``log softmax(((1 + w) ℓ_c − w ℓ_u) / τ)`` (:func:`~dflow_trl.sampling.guided_log_probs`). The one
    definition rollouts sample from and the loss scores with, so the two never disagree.

    With ``w ≠ 0`` and ``batch_cfg`` the conditional and unconditional passes are one forward of
    ``2B`` rows (the same logits to float tolerance, half the launches and weight reads); set it
    False when a ``2B`` forward does not fit."""
    if cfg_scale == 0:
        return guided_log_probs(flow_logits(model, batch, canvas, t=t), None, cfg_scale, temperature)
    if not batch_cfg:
        cond = flow_logits(model, batch, canvas, t=t)
        uncond = flow_logits(model, batch, canvas, unconditional=True, t=t)
        return guided_log_probs(cond, uncond, cfg_scale, temperature)
    both = flow_logits(model, batch.with_unconditional_rows(), torch.cat([canvas, canvas]), t=t)
    cond, uncond = both.chunk(2)
    return guided_log_probs(cond, uncond, cfg_scale, temperature)


@torch.no_grad()
def rollout(
    model: Any,
    batch: FlowInputs,
    path: ProbabilityPath,
    num_steps: int,
    cfg_scale: float = 0.0,
    temperature: float = 1.0,
    estimator: Estimator | None = None,
    generator: torch.Generator | None = None,
    chunk_size: int | None = None,
    branch_steps: torch.LongTensor | None = None,
    group_size: int = 1,
    record_greedy: bool = False,
    time_power: float = 1.0,
    record_entropy: bool = False,
    batch_cfg: bool = True,
    start: tuple[int, torch.LongTensor] | None = None,
) -> Trajectory:
    """Sample ``x_0 ~ p_0`` and roll it to ``t = 1``, recording what ``estimator`` needs.

    ``chunk_size`` rollouts share one forward pass (all by default). ``branch_steps`` /
    ``group_size``: groups of consecutive rows share their trajectory up to a step and branch
    there (:func:`~dflow_trl.sampling.sample_trajectory`); chunks then hold whole groups.
    ``time_power``: the grid ``t_k = (k / K)^power`` (:func:`~dflow_trl.sampling.time_grid`).
    ``batch_cfg``: one forward of ``2 · chunk`` rows per CFG step (:func:`flow_log_posterior`).
    ``start = (k, x_k)``: continue the recorded states ``x_k`` (``(B, D)``) from ``t_k`` instead of
    drawing ``x_0``; the trajectory then holds steps ``k .. K − 1`` only."""
    if cfg_scale != 0 and batch.uncond_input_ids is None:
        raise ValueError("cfg_scale != 0 but the model defines no unconditional input")
    b, d = batch.batch_size, batch.canvas_length
    device = batch.input_ids.device
    chunk = chunk_size or b
    if branch_steps is not None and chunk % group_size:
        chunk = max(group_size, chunk // group_size * group_size)
    times = time_grid(num_steps, device=device, power=time_power)
    if start is not None:
        first, states = start
        if not 0 <= first < num_steps or tuple(states.shape) != (b, d):
            raise ValueError(
                f"start must be (k, x_k) with 0 <= k < {num_steps} and x_k of shape {(b, d)}, "
                f"got k = {first} and {tuple(states.shape)}"
            )
        times = times[first:]
    parts = []
    for s in range(0, b, chunk):
        sub = batch.index(slice(s, s + chunk))
        if start is None:
            x0 = path.sample_source((sub.batch_size, d), generator=generator, device=device)
        else:
            x0 = start[1][s : s + chunk]
        parts.append(
            sample_trajectory(
                path,
                None,
                x0,
                times=times,
                log_posterior_fn=(
                    lambda x, t, sub=sub: flow_log_posterior(
                        model, sub, x, t, cfg_scale, temperature, batch_cfg
                    )
                ),
                estimator=estimator,
                generator=generator,
                branch_steps=None if branch_steps is None else branch_steps[s : s + chunk],
                group_size=group_size,
                record_greedy=record_greedy,
                record_entropy=record_entropy,
            )
        )
    if len(parts) == 1:
        return parts[0]
    merged = {k: torch.cat([p.to_dict()[k] for p in parts]) for k in parts[0].to_dict()}
    return Trajectory.from_dict(merged)


@torch.no_grad()
def generate(
    model: Any,
    prompts: list[Any],
    processing_class: Any = None,
    num_steps: int = 20,
    cfg_scale: float = 0.0,
    temperature: float = 1.0,
    seed: int | None = None,
    chunk_size: int | None = None,
    time_power: float = 1.0,
    **columns: list[Any],
) -> tuple[torch.LongTensor, list[Any]]:
    """Sample one canvas per prompt: returns ``(canvas (B, D), decoded)`` (PIL images or strings)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    batch = base.prepare_flow_inputs(list(prompts), processing_class, **columns)
    gen = None
    if seed is not None:
        gen = torch.Generator(device=batch.input_ids.device).manual_seed(seed)
    traj = rollout(
        model,
        batch,
        base.get_probability_path(),
        num_steps,
        cfg_scale,
        temperature,
        generator=gen,
        chunk_size=chunk_size,
        time_power=time_power,
    )
    return traj.final, base.decode_canvas(traj.final, processing_class)
