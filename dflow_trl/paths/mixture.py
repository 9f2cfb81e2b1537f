"""Mixture paths ``p_t = (1 - κ_t) p_0 + κ_t δ_{x1}`` with a masked or uniform source.

The conditional rate is ``κ̇_t / (1 - κ_t)`` towards ``x1`` only, so a token that differs from
``x1`` jumps straight to ``x1``. Integrated over ``[t, t + h]`` the jump probability is exact:

    q = (κ_{t+h} - κ_t) / (1 - κ_t),      K_h(x → y | x1) = (1 - q) δ_x(y) + q δ_{x1}(y),

which also covers ``x1 = x`` (then ``K = δ_x``). Summing over the posterior gives the closed form
``π(y | x) = (1 - q) δ_x(y) + q p_{1|t}(y | x)``. With a masked source, tokens that are not the mask
are already ``x1`` (the path never visits anything else) and stay put: ``q = 0`` for them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from .base import ProbabilityPath, as_time, check_step, is_last_step


@dataclass(frozen=True)
class PolynomialScheduler:
    """``κ_t = t^n`` (``n = 1`` is the linear schedule of masked diffusion LMs)."""

    exponent: float = 1.0

    def __post_init__(self) -> None:
        if not self.exponent > 0:
            raise ValueError(f"PolynomialScheduler exponent must be > 0, got {self.exponent}")

    def kappa(self, t: torch.Tensor) -> torch.Tensor:
        return t**self.exponent


class MixturePath(ProbabilityPath):
    """Mixture path over ``[V]`` with source ``"mask"`` (δ at ``mask_token_id``) or ``"uniform"``.

    Args:
        vocab_size: V, the canvas vocabulary size (the mask token included for masked sources).
        source: ``"mask"`` or ``"uniform"``.
        mask_token_id: the mask token, required for ``source="mask"``.
        scheduler: κ_t; a :class:`PolynomialScheduler` (default linear) or a float exponent.
    """

    exact_is_cheap = True

    def __init__(
        self,
        vocab_size: int,
        source: Literal["mask", "uniform"] = "mask",
        mask_token_id: int | None = None,
        scheduler: PolynomialScheduler | float | None = None,
    ) -> None:
        if int(vocab_size) < 2:
            raise ValueError(f"vocab_size must be >= 2, got {vocab_size}")
        self.vocab_size = int(vocab_size)
        if source not in ("mask", "uniform"):
            raise ValueError(f"source must be 'mask' or 'uniform', got {source!r}")
        self.source = source
        if source == "mask":
            if mask_token_id is None or not 0 <= int(mask_token_id) < self.vocab_size:
                raise ValueError(
                    f"source='mask' needs mask_token_id in [0, {self.vocab_size}), got {mask_token_id!r}"
                )
            self.mask_token_id: int | None = int(mask_token_id)
        else:
            self.mask_token_id = None
        if scheduler is None:
            scheduler = PolynomialScheduler(1.0)
        elif isinstance(scheduler, (int, float)):
            scheduler = PolynomialScheduler(float(scheduler))
        self.scheduler = scheduler

    def __repr__(self) -> str:
        return (
            f"MixturePath(vocab_size={self.vocab_size}, source={self.source!r}, "
            f"mask_token_id={self.mask_token_id}, scheduler={self.scheduler})"
        )

    # ---- path -------------------------------------------------------------------------------
    def sample_source(self, shape, generator=None, device=None):
        if self.source == "mask":
            return torch.full(tuple(shape), self.mask_token_id, dtype=torch.long, device=device)
        return torch.randint(0, self.vocab_size, tuple(shape), generator=generator, device=device)

    def sample_conditional(self, x1, t, generator=None):
        self.check_tokens(x1, "x1")
        kappa = self.scheduler.kappa(as_time(t, x1, allow_one=True))
        keep = torch.rand(x1.shape, generator=generator, device=x1.device, dtype=kappa.dtype) < kappa
        return torch.where(keep, x1, self.sample_source(x1.shape, generator=generator, device=x1.device))

    # ---- kernel -----------------------------------------------------------------------------
    def jump_probability(self, x_t: torch.Tensor, t, h) -> torch.Tensor:
        """``q`` per position: the chance of jumping to ``x1`` during the step (0 where frozen)."""
        tt, hh = check_step(t, h, x_t)
        k0, k1 = self.scheduler.kappa(tt), self.scheduler.kappa(tt + hh)
        q = torch.where(is_last_step(tt, hh), torch.ones_like(k0), (k1 - k0) / (1 - k0)).clamp(0, 1)
        q = q.expand(x_t.shape)
        if self.source == "mask":
            q = torch.where(x_t == self.mask_token_id, q, torch.zeros_like(q))
        return q

    def kernel_log_prob(self, x_t, x_next, x1, t, h):
        for name, v in (("x_t", x_t), ("x_next", x_next), ("x1", x1)):
            self.check_tokens(v, name)
        x_t, x_next, x1 = torch.broadcast_tensors(x_t, x_next, x1)
        q = self.jump_probability(x_t, t, h)
        prob = (1 - q) * (x_next == x_t) + q * (x_next == x1)
        return prob.log()

    def sample_kernel(self, x_t, x1, t, h, generator=None):
        self.check_tokens(x_t, "x_t")
        self.check_tokens(x1, "x1")
        x_t, x1 = torch.broadcast_tensors(x_t, x1)
        q = self.jump_probability(x_t, t, h)
        jump = torch.rand(x_t.shape, generator=generator, device=x_t.device, dtype=q.dtype) < q
        return torch.where(jump, x1, x_t)

    def step_log_prob(self, posterior_probs, x_t, x_next, t, h):
        self.check_posterior(posterior_probs)
        self.check_tokens(x_t, "x_t")
        self.check_tokens(x_next, "x_next")
        posterior_probs, x_t, x_next = self.broadcast_step(posterior_probs, x_t, x_next)
        q = self.jump_probability(x_t, t, h).to(posterior_probs.dtype)
        p_next = posterior_probs.gather(-1, x_next.unsqueeze(-1)).squeeze(-1)
        return ((1 - q) * (x_next == x_t) + q * p_next).log()

    def stay_floor(self, x_t, t, h):
        return 1 - self.jump_probability(x_t, t, h)

    def moves_at(self, t: float, h: float) -> bool:
        tt = torch.tensor(float(t), dtype=torch.float64)
        return bool(self.scheduler.kappa(tt + float(h)) > self.scheduler.kappa(tt))
