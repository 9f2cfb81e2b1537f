"""The interface every probability path implements.

Notation (docs/method.md §1–2): a canvas token ``x ∈ [V]``, time ``t ∈ [0, 1)``, step ``h > 0``, the
path's conditional law ``p_t(x | x1)`` with source ``p_0``, and the one-step kernel given ``x1``

    K_h(x → y | x1) = exp(-h λ)                       if y = x
                      u_t(y, x | x1) / λ · (1 - e^{-hλ})  otherwise,   λ = Σ_{y≠x} u_t(y, x | x1),

unless the path has an exact integrated kernel. A step that reaches ``t + h = 1`` takes ``x1``
itself. The policy of one step is ``π(y | x) = Σ_{x1} p_{1|t}(x1 | x) K_h(x → y | x1)``, per position.

All tensors of token ids are ``torch.long``; shapes broadcast elementwise unless stated.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch

# Steps ending within this distance of t = 1 are "the last step": they take x1 itself.
LAST_STEP_ATOL = 1e-6


def as_time(t: float | torch.Tensor, like: torch.Tensor, allow_one: bool = False) -> torch.Tensor:
    """``t`` as a float64 tensor on ``like``'s device, validated to lie in [0, 1) (or [0, 1])."""
    tt = torch.as_tensor(t, dtype=torch.float64, device=like.device)
    too_big = (tt > 1) if allow_one else (tt >= 1)
    if not torch.isfinite(tt).all() or (tt < 0).any() or too_big.any():
        raise ValueError(f"time t must lie in [0, {'1]' if allow_one else '1)'}, got {t!r}")
    return tt


def check_step(
    t: float | torch.Tensor, h: float | torch.Tensor, like: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Validate a step ``t → t + h``: ``0 ≤ t < 1``, ``h > 0``, ``t + h ≤ 1``."""
    tt = as_time(t, like)
    hh = torch.as_tensor(h, dtype=torch.float64, device=like.device)
    if not torch.isfinite(hh).all() or (hh <= 0).any():
        raise ValueError(f"step size h must be > 0, got {h!r}")
    if (tt + hh > 1 + LAST_STEP_ATOL).any():
        raise ValueError(f"step t + h must not pass 1 (t={t!r}, h={h!r})")
    return tt, hh


def is_last_step(t: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    return (t + h) >= 1 - LAST_STEP_ATOL


class ProbabilityPath(ABC):
    """A family of conditional laws ``p_t(· | x1)`` with its source and transition kernel."""

    vocab_size: int

    # Whether ``step_log_prob`` is affordable at this path's vocabulary size for full canvases.
    exact_is_cheap: bool = False

    # ---- validation -------------------------------------------------------------------------
    def check_tokens(self, x: torch.Tensor, name: str = "tokens") -> None:
        if x.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
            raise ValueError(f"{name} must be an integer tensor of token ids, got dtype {x.dtype}")
        if x.numel() and (int(x.min()) < 0 or int(x.max()) >= self.vocab_size):
            raise ValueError(
                f"{name} must be token ids in [0, {self.vocab_size}), "
                f"got values in [{int(x.min())}, {int(x.max())}]"
            )

    def check_posterior(self, probs: torch.Tensor, atol: float = 1e-4) -> None:
        if probs.shape[-1] != self.vocab_size:
            raise ValueError(
                f"posterior has {probs.shape[-1]} classes; the path's vocabulary has {self.vocab_size}"
            )
        if not probs.is_floating_point():
            raise ValueError("posterior must be a floating tensor of probabilities")
        bad = ~torch.isfinite(probs.detach())
        if bad.any():
            where = bad.nonzero()[0].tolist()
            raise FloatingPointError(
                f"the posterior is not finite ({int(bad.sum())} NaN/inf entries, first at index {where}): "
                "the model's canvas logits hold NaN or +inf (or CFG/temperature turned them so); "
                "check the model's forward"
            )
        total = probs.detach().sum(-1)
        if (probs.detach() < 0).any() or not torch.allclose(total, torch.ones_like(total), atol=atol):
            raise ValueError(
                "posterior must be probabilities summing to 1 over the last dimension "
                f"(sums lie in [{float(total.min()):.6f}, {float(total.max()):.6f}]); "
                "pass softmax(logits), not logits"
            )

    def broadcast_step(
        self, probs: torch.Tensor, x_t: torch.Tensor, x_next: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Broadcast ``probs`` ``(..., V)`` and ``x_t``/``x_next`` ``(...)`` to common batch dims."""
        shape = torch.broadcast_shapes(probs.shape[:-1], x_t.shape, x_next.shape)
        return probs.expand(*shape, probs.shape[-1]), x_t.expand(shape), x_next.expand(shape)

    # ---- the path ---------------------------------------------------------------------------
    @abstractmethod
    def sample_source(
        self,
        shape: tuple[int, ...],
        generator: torch.Generator | None = None,
        device: torch.device | str | None = None,
    ) -> torch.LongTensor:
        """``x_0 ~ p_0`` of the given shape."""

    @abstractmethod
    def sample_conditional(
        self, x1: torch.LongTensor, t: float | torch.Tensor, generator: torch.Generator | None = None
    ) -> torch.LongTensor:
        """``x_t ~ p_t(· | x1)`` elementwise (for pretraining by discrete flow matching).

        ``t`` is a float or a tensor broadcastable to ``x1`` (e.g. ``(B, 1)`` per sample)."""

    @abstractmethod
    def kernel_log_prob(
        self,
        x_t: torch.LongTensor,
        x_next: torch.LongTensor,
        x1: torch.LongTensor,
        t: float | torch.Tensor,
        h: float | torch.Tensor,
    ) -> torch.Tensor:
        """``log K_h(x_t → x_next | x1)`` elementwise (``-inf`` where impossible)."""

    @abstractmethod
    def sample_kernel(
        self,
        x_t: torch.LongTensor,
        x1: torch.LongTensor,
        t: float | torch.Tensor,
        h: float | torch.Tensor,
        generator: torch.Generator | None = None,
    ) -> torch.LongTensor:
        """``x_next ~ K_h(x_t → · | x1)`` elementwise."""

    @abstractmethod
    def step_log_prob(
        self,
        posterior_probs: torch.Tensor,
        x_t: torch.LongTensor,
        x_next: torch.LongTensor,
        t: float | torch.Tensor,
        h: float | torch.Tensor,
    ) -> torch.Tensor:
        """Exact ``log Σ_{x1} p(x1) K_h(x_t → x_next | x1)`` per position.

        ``posterior_probs`` is ``(..., V)``; ``x_t``/``x_next`` are ``(...)``. Differentiable in the
        posterior."""

    def stay_floor(
        self, x_t: torch.LongTensor, t: float | torch.Tensor, h: float | torch.Tensor
    ) -> torch.Tensor:
        """A lower bound ``f(x_t) ≤ min_{x1} K_h(x_t → x_t | x1)`` that holds for every ``x1``.

        Estimators use ``f δ_{x_t}`` as an exact, θ-independent part of the kernel (a control
        variate); the sampler stays put with probability ``f`` before consulting the posterior.
        ``0`` is always valid; mixture paths return their exact no-jump probability."""
        return torch.zeros(x_t.shape, dtype=torch.float64, device=x_t.device)

    def moves_at(self, t: float, h: float) -> bool:
        """Whether any token can move during ``[t, t + h]`` (step 0 of FUDOKI's path cannot)."""
        return True
