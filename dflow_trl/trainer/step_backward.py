"""Backpropagating each trained denoising step right after its forward (``step_checkpointing``).

TRL's loss ``L`` sees the ``(B, T)`` step log-probabilities ``ℓ_{b,j} = log π̂_θ(x_{k+1} | x_k)`` and
runs one backward. Keeping every step's graph until then makes memory grow with T; recomputing
each step's forward in that backward (activation checkpointing) costs one more forward per step.

With token-level importance ratios and no cross-step term (no entropy mask, no sequence-level
weights), TRL's per-token loss makes ``G_{b,j} = ∂L/∂ℓ_{b,j}`` a function of ``ℓ_{b,j}`` alone
(ratio, clipping and the k3 KL term are all per token). So as soon as a step's ``ℓ_k`` is known,
its ``G_k`` can be read from TRL's own loss at a probe holding ``ℓ_k`` (the other entries at any
value), ``J_kᵀ G_k`` (``J_k = ∂ℓ_k/∂θ``) taken at once and the step's graph freed: the
forward+backward floor. :class:`StepGradients` hands ``Σ_k J_kᵀ G_k`` to the parameters inside TRL's
single backward, so DDP's and DeepSpeed's gradient hooks, gradient accumulation and loss scaling
see an ordinary backward. It checks that the gradient arriving is ``s · G`` (``s`` absorbs TRL's and
the Trainer's scaling) and raises if it is not, so a loss whose per-step gradient depends on other
steps cannot slip through silently.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

# |∂L/∂ℓ − s G| above this fraction of |∂L/∂ℓ| means G was not the loss's gradient.
_TOLERANCE = 1e-4


class StepGradients:
    """Parameter gradients ``Σ_k J_kᵀ G_k`` accumulated step by step for the trainable ``params``.

    ``loss_gradient(ℓ)`` is ``∂L/∂ℓ`` of TRL's loss at a ``(B, T)`` probe; ``values`` holds the entries
    already known (skipped rows, TRL's old log-probabilities or anything else elsewhere)."""

    def __init__(
        self,
        params: list[torch.nn.Parameter],
        loss_gradient: Callable[[torch.Tensor], torch.Tensor],
        values: torch.Tensor,
    ) -> None:
        self.params = params
        self.loss_gradient = loss_gradient
        self.values = values.detach().clone()
        self.weights = torch.zeros_like(self.values)
        # The entries a step filled; the others are constants, whatever gradient reaches them.
        self.visited = torch.zeros_like(self.values, dtype=torch.bool)
        self.grads: list[torch.Tensor | None] = [None] * len(params)

    def add(self, step_log_probs: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> None:
        """Backpropagate the ``(b,)`` log-probabilities of entries ``(rows, cols)`` with their loss
        weights ``G`` and free their graph."""
        self.values[rows, cols] = step_log_probs.detach().to(self.values.dtype)
        weights = self.loss_gradient(self.values)[rows, cols]
        self.weights[rows, cols] = weights
        self.visited[rows, cols] = True
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
        grad_out = grad_out * store.visited
        w = store.weights.to(grad_out.dtype)
        norm = (w * w).sum()
        scale = (grad_out * w).sum() / norm if norm > 0 else grad_out.new_zeros(())
        residual = (grad_out - scale * w).abs().max()
        if residual > _TOLERANCE * grad_out.abs().max().clamp_min(1e-30):
            raise RuntimeError(
                "step_checkpointing: the loss's gradient with respect to the step log-probabilities is not "
                "the one read step by step (a step's gradient depends on other steps: a TRL loss that "
                "changed, or a setting not yet recognised as such). Set step_checkpointing=False or report "
                "this with your config."
            )
        grads = [None if g is None else (g * scale).to(p.dtype) for g, p in zip(store.grads, store.params)]
        return (None, None, *grads)
