"""Exponential moving average of the trained weights (the paper releases EMA adapters; Flow-GRPO
trains with one).

Every ``interval`` optimizer steps, ``θ̄ ← d θ̄ + (1 − d) θ`` over the trainable parameters only
(the LoRA weights of an adapter run), with ``θ̄`` starting at the initial ``θ``. The trainer saves
``θ̄`` beside the weights as a loadable ``ema/`` folder and evaluates with it.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from safetensors.torch import load_file, save_file
from transformers import TrainerCallback

EMA_STATE_NAME = "ema_state.safetensors"


class ParameterEMA:
    """Shadow copies ``θ̄`` of the parameters that require grad."""

    def __init__(self, model: torch.nn.Module, decay: float, interval: int = 1) -> None:
        if not 0.0 < decay < 1.0:
            raise ValueError(f"EMA decay must lie in (0, 1), got {decay}")
        if int(interval) < 1:
            raise ValueError(f"EMA update interval must be >= 1, got {interval}")
        self.decay, self.interval = float(decay), int(interval)
        self.params = {n: p for n, p in model.named_parameters() if p.requires_grad}
        # fp32 shadows: a bf16 average of small updates would round them away.
        self.shadow = {n: p.detach().float().clone() for n, p in self.params.items()}

    @torch.no_grad()
    def update(self, step: int) -> None:
        """Average in the current weights if ``step`` (the optimizer steps so far) is on the interval."""
        if step % self.interval:
            return
        for name, p in self.params.items():
            self.shadow[name].lerp_(p.detach().float(), 1.0 - self.decay)

    @contextmanager
    def applied(self) -> Iterator[None]:
        """Swap ``θ̄`` into the model for the block; the live weights come back bit for bit."""
        live = {n: p.detach().clone() for n, p in self.params.items()}
        try:
            with torch.no_grad():
                for name, p in self.params.items():
                    p.copy_(self.shadow[name].to(p.dtype))
            yield
        finally:
            with torch.no_grad():
                for name, p in self.params.items():
                    p.copy_(live[name])

    def save(self, directory: str) -> None:
        state = {n: t.contiguous() for n, t in self.shadow.items()}
        save_file(state, os.path.join(directory, EMA_STATE_NAME))

    def load(self, directory: str) -> None:
        """Restore ``θ̄`` from a checkpoint ``save`` wrote (same trainable parameters)."""
        state = load_file(os.path.join(directory, EMA_STATE_NAME))
        if state.keys() != self.shadow.keys():
            missing = sorted(self.shadow.keys() - state.keys())[:3]
            raise ValueError(
                f"{directory}: its EMA state does not match the trainable parameters (e.g. {missing} "
                "missing); resume with the same model, adapter and ema settings"
            )
        for name, tensor in state.items():
            self.shadow[name].copy_(tensor)


class EMACallback(TrainerCallback):
    """Updates a :class:`ParameterEMA` after every optimizer step."""

    def __init__(self, ema: ParameterEMA) -> None:
        self.ema = ema

    def on_step_end(self, args, state, control, **kwargs):
        self.ema.update(state.global_step)
