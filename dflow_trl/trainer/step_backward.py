"""Backpropagating each trained denoising step right after its forward (``step_checkpointing``).

TRL's loss ``L`` sees the ``(B, T)`` step log-probabilities ``ℓ_{b,j} = log π̂_θ(x_{k+1} | x_k)`` and
runs one backward. Keeping every step's graph until then makes memory grow with T; recomputing
each step's forward in that backward (activation checkpointing) costs one more forward per step.

When ``G = ∂L/∂ℓ`` does not depend on the value of ``ℓ`` — on-policy, i.e. TRL's old
log-probabilities are ``ℓ.detach()`` so every ratio is exactly 1, and no KL term — ``G`` can be read
before any step runs, from TRL's own loss evaluated at a probe. Each step then contributes
``J_kᵀ G_k`` (``J_k = ∂ℓ_k/∂θ``) at once and its graph is freed, at the forward+backward floor.
:class:`StepGradients` hands the summed ``Σ_k J_kᵀ G_k`` to the parameters inside TRL's single
backward, so DDP's and DeepSpeed's gradient hooks, gradient accumulation and loss scaling see an
ordinary backward. It checks that the gradient arriving is ``s · G`` (``s`` absorbs TRL's and the
Trainer's scaling) and raises if it is not, so a loss whose gradient does depend on ``ℓ`` cannot
slip through silently.
"""

from __future__ import annotations

from typing import Any

import torch

# |∂L/∂ℓ − s G| above this fraction of |∂L/∂ℓ| means G was not the loss's gradient.
_TOLERANCE = 1e-4


class StepGradients:
    """Parameter gradients ``Σ_k J_kᵀ G_k`` accumulated step by step for the trainable ``params``."""

    def __init__(self, params: list[torch.nn.Parameter], weights: torch.Tensor) -> None:
        self.params = params
        self.weights = weights.detach()
        self.grads: list[torch.Tensor | None] = [None] * len(params)

    def add(self, step_log_probs: torch.Tensor, weights: torch.Tensor) -> None:
        """Backpropagate one step's ``(b,)`` log-probabilities with their ``(b,)`` loss weights ``G_k``
        and free its graph."""
        if not bool((weights != 0).any()):
            return
        parts = torch.autograd.grad(
            step_log_probs, self.params, grad_outputs=weights.to(step_log_probs.dtype), allow_unused=True
        )
        for n, part in enumerate(parts):
            if part is None:
                continue
            if self.grads[n] is None:
                self.grads[n] = part
            else:
                self.grads[n].add_(part)

    def attach(self, values: torch.Tensor) -> torch.Tensor:
        """``values`` (the ``(B, T)`` log-probabilities, detached) as a tensor whose backward deposits the
        accumulated gradients on the parameters."""
        return _Deposit.apply(values.detach(), self, *self.params)


class _Deposit(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, values: torch.Tensor, store: StepGradients, *params: torch.Tensor) -> torch.Tensor:
        ctx.store = store
        return values.clone()

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        store: StepGradients = ctx.store
        w = store.weights.to(grad_out.dtype)
        norm = (w * w).sum()
        scale = (grad_out * w).sum() / norm if norm > 0 else grad_out.new_zeros(())
        residual = (grad_out - scale * w).abs().max()
        if residual > _TOLERANCE * grad_out.abs().max().clamp_min(1e-30):
            raise RuntimeError(
                "step_checkpointing: the loss's gradient with respect to the step log-probabilities is not "
                "the one read before the steps ran (it depends on their values: a KL term, several "
                "iterations per batch, or a TRL loss that changed). Set step_checkpointing=False or report "
                "this with your config."
            )
        grads = [None if g is None else (g * scale).to(p.dtype) for g, p in zip(store.grads, store.params)]
        return (None, None, *grads)
