"""FUDOKI's metric-induced path with kinetic-optimal rates (Shaul et al. 2024).

With ``ê`` the L2-normalised embedding rows and ``d(y, x1) = ‖ê_y - ê_x1‖^4``:

    p_t(y | x1) = softmax_y(-β_t d(y, x1)),      β_t = c (t / (1 - t))^a,   β̇_0 := 0,
    u_t(y, x | x1) = p_t(y | x1) β̇_t [d(x, x1) - d(y, x1)]_+,   λ(x, x1) = Σ_{y≠x} u_t(y, x | x1).

The source is uniform (``β_0 = 0``). One step holds the rates at ``t`` constant over ``[t, t + h]``
(FUDOKI's Euler step): ``K_h(x → x | x1) = e^{-hλ}``, ``K_h(x → y | x1) = u/λ · (1 - e^{-hλ})``.
The step that reaches ``t = 1`` takes ``x1`` itself.

λ and the normaliser ``Z(x1) = Σ_y exp(-β_t d(y, x1))`` need a pass over the vocabulary; they
depend only on ``(x, x1, t)``, so they are computed once per distinct ``x1`` (λ from prefix sums in
the order of ``d(·, x1)``, kept for vocabularies up to 2048) or, for larger ones, once per unique
pair, ``chunk_elements`` at a time; nothing of size ``(positions, V, V)`` is ever held.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .base import LAST_STEP_ATOL, ProbabilityPath, as_time


def _scalar(v: float | torch.Tensor, name: str) -> float:
    if torch.is_tensor(v):
        if v.numel() != 1:
            raise ValueError(
                f"MetricInducedPath takes one {name} for the whole batch, got shape {tuple(v.shape)}"
            )
        v = v.item()
    return float(v)


class MetricInducedPath(ProbabilityPath):
    """Metric-induced probability path over the rows of ``embeddings`` (``(V, E)``).

    Args:
        embeddings: ``(V, E)`` tensor (or ``nn.Embedding``) defining the metric; rows are
            L2-normalised here.
        c, a: schedule ``β_t = c (t/(1-t))^a`` (FUDOKI: 3.0, 0.9).
        chunk_elements: upper bound on the size of temporary ``(pairs, V)`` blocks (default 2^22 on
            CPU, 2^27 on GPU, where many small launches would dominate).
        dtype: compute dtype; float64 by default up to V = 4096 (tests compare to 1e-6), else float32.
    """

    def __init__(
        self,
        embeddings: torch.Tensor | torch.nn.Embedding,
        c: float = 3.0,
        a: float = 0.9,
        chunk_elements: int | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        if isinstance(embeddings, torch.nn.Embedding):
            embeddings = embeddings.weight
        emb = torch.as_tensor(embeddings).detach()
        if emb.ndim != 2 or emb.shape[0] < 2 or emb.shape[1] < 1:
            raise ValueError(f"embeddings must be a (V, E) matrix with V >= 2, got shape {tuple(emb.shape)}")
        if not emb.is_floating_point() or not torch.isfinite(emb).all():
            raise ValueError("embeddings must be finite floating-point values")
        norms = emb.double().norm(dim=-1)
        if (norms == 0).any():
            raise ValueError(
                f"embedding rows {torch.nonzero(norms == 0).flatten()[:5].tolist()} are zero; "
                "the metric needs L2-normalisable rows"
            )
        if not (c > 0 and a > 0):
            raise ValueError(f"schedule needs c > 0 and a > 0, got c={c}, a={a}")
        self.vocab_size = emb.shape[0]
        self.c, self.a = float(c), float(a)
        self.chunk_elements = chunk_elements
        self.dtype = dtype or (torch.float64 if self.vocab_size <= 4096 else torch.float32)
        self.unit = F.normalize(emb.to(self.dtype), dim=-1)
        self.exact_is_cheap = self.vocab_size <= 512
        self._sorted: tuple[torch.Tensor, torch.Tensor] | None = None

    def __repr__(self) -> str:
        return (
            f"MetricInducedPath(vocab_size={self.vocab_size}, dim={self.unit.shape[1]}, "
            f"c={self.c}, a={self.a})"
        )

    def to(self, device: torch.device | str) -> MetricInducedPath:
        self.unit = self.unit.to(device)
        self._sorted = None
        return self

    # ---- schedule ---------------------------------------------------------------------------
    def beta(self, t: float) -> float:
        return 0.0 if t <= 0 else self.c * (t / (1 - t)) ** self.a

    def beta_dot(self, t: float) -> float:
        """``β̇_t = c a (t/(1-t))^{a-1} / (1-t)^2``, set to 0 at ``t = 0`` as FUDOKI does."""
        return 0.0 if t <= 0 else self.c * self.a * (t / (1 - t)) ** (self.a - 1) / (1 - t) ** 2

    # ---- metric -----------------------------------------------------------------------------
    def _unit(self, device: torch.device) -> torch.Tensor:
        if self.unit.device != device:
            self.unit = self.unit.to(device)
        return self.unit

    def distance_rows(self, x1: torch.Tensor) -> torch.Tensor:
        """``(N, V)``: ``d(·, x1_n)`` for each of the N ids."""
        u = self._unit(x1.device)
        return (2 - 2 * u[x1] @ u.T).clamp_min(0) ** 2

    def pair_distance(self, x: torch.Tensor, x1: torch.Tensor) -> torch.Tensor:
        u = self._unit(x.device)
        return (2 - 2 * (u[x] * u[x1]).sum(-1)).clamp_min(0) ** 2

    def _chunk(self, per_row: int) -> int:
        budget = self.chunk_elements or (1 << 27 if self.unit.is_cuda else 1 << 22)
        return max(1, budget // max(per_row, 1))

    def log_normalizer(self, x1: torch.Tensor, t: float) -> torch.Tensor:
        """``log Z(x1) = log Σ_y exp(-β_t d(y, x1))`` for a flat tensor of ids."""
        uniq, inverse = torch.unique(x1.reshape(-1), return_inverse=True)
        beta, step = self.beta(t), self._chunk(self.vocab_size)
        out = torch.empty(uniq.numel(), dtype=self.dtype, device=x1.device)
        for s in range(0, uniq.numel(), step):
            out[s : s + step] = torch.logsumexp(-beta * self.distance_rows(uniq[s : s + step]), -1)
        return out[inverse].view(x1.shape)

    # The order of d(·, x1) does not depend on t: up to this many (V·V) entries it is sorted once
    # and kept (16 bytes an entry: 16 MB at V = 1024). Larger vocabularies take the direct sum,
    # since sorting afresh costs more than the few pairs a rollout step asks per distinct x1.
    SORT_CACHE_ELEMENTS = 1 << 22

    def _sorted_table(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """``(V, V)``: row ``x1`` holds ``d(·, x1)`` sorted ascending, and every token's rank in it."""
        if self._sorted is None or self._sorted[0].device != device:
            self._sorted = None  # free the old device's copy first
            d_sorted, order = self.distance_rows(torch.arange(self.vocab_size, device=device)).sort(dim=-1)
            ranks = torch.arange(self.vocab_size, device=device).expand_as(order)
            self._sorted = d_sorted, torch.empty_like(order).scatter_(-1, order, ranks)
        return self._sorted

    def exit_rate(self, x: torch.Tensor, x1: torch.Tensor, t: float) -> torch.Tensor:
        """``λ(x, x1)`` elementwise.

        Up to ``SORT_CACHE_ELEMENTS``: ``λ(x, x1) = β̇ (d_x M - S)`` with ``M``, ``S`` the mass and
        first moment of ``p_t(· | x1)`` on the tokens closer to ``x1`` than ``x`` (``d_x = d(x, x1)``),
        prefix sums in the cached order of ``d(·, x1)``: one V-sized pass per distinct ``x1``, where a
        rollout step asks for tens of ``(x, x1)`` pairs per position. Beyond it, a V-sized pass per
        unique pair."""
        shape = x.shape
        x, x1 = x.reshape(-1), x1.reshape(-1)
        beta, bdot = self.beta(t), self.beta_dot(t)
        if bdot == 0 or x.numel() == 0:
            return torch.zeros(shape, dtype=self.dtype, device=x.device)
        if self.vocab_size**2 > self.SORT_CACHE_ELEMENTS:
            return self._exit_rate_direct(x, x1, beta, bdot).view(shape)
        d_table, rank_table = self._sorted_table(x.device)
        uniq, inverse = torch.unique(x1, return_inverse=True)
        by_x1 = torch.argsort(inverse)
        lam = torch.empty(x.numel(), dtype=self.dtype, device=x.device)
        # About six (chunk, V) temporaries live at once.
        step = self._chunk(6 * self.vocab_size)
        starts = torch.arange(0, uniq.numel() + step, step, device=x.device)
        bounds = torch.searchsorted(inverse[by_x1], starts).tolist()
        for i, s in enumerate(range(0, uniq.numel(), step)):
            d_sorted = d_table[uniq[s : s + step]]
            p_sorted = torch.softmax(-beta * d_sorted, dim=-1)
            # Exclusive prefix sums: what lies strictly before each token in the sorted order. Tokens
            # tied with x that sort before it add p (d_x - d_x) = 0, as in the direct sum.
            mass = F.pad(p_sorted.cumsum(-1), (1, 0))
            moment = F.pad((p_sorted * d_sorted).cumsum(-1), (1, 0))
            pairs = by_x1[bounds[i] : bounds[i + 1]]
            r = inverse[pairs] - s
            pos = rank_table[x1[pairs], x[pairs]]
            dx = d_sorted[r, pos]
            lam[pairs] = bdot * (dx * mass[r, pos] - moment[r, pos]).clamp_min(0)
        return lam.view(shape)

    def _exit_rate_direct(self, x: torch.Tensor, x1: torch.Tensor, beta: float, bdot: float) -> torch.Tensor:
        keys, inverse = torch.unique(x * self.vocab_size + x1, return_inverse=True)
        ux, ux1 = keys // self.vocab_size, keys % self.vocab_size
        lam = torch.empty(keys.numel(), dtype=self.dtype, device=x.device)
        step = self._chunk(self.vocab_size)
        for s in range(0, keys.numel(), step):
            rows = self.distance_rows(ux1[s : s + step])
            p = torch.softmax(-beta * rows, dim=-1)
            dx = rows.gather(1, ux[s : s + step, None])
            lam[s : s + step] = bdot * (p * (dx - rows).clamp_min(0)).sum(-1)
        return lam[inverse]

    # ---- path -------------------------------------------------------------------------------
    def sample_source(self, shape, generator=None, device=None):
        return torch.randint(0, self.vocab_size, tuple(shape), generator=generator, device=device)

    def sample_conditional(self, x1, t, generator=None):
        self.check_tokens(x1, "x1")
        tt = as_time(t, x1, allow_one=True).expand(x1.shape).reshape(-1)
        flat, out = x1.reshape(-1), torch.empty(x1.numel(), dtype=torch.long, device=x1.device)
        step = self._chunk(self.vocab_size)
        for s in range(0, flat.numel(), step):
            ts = tt[s : s + step].to(self.dtype)
            beta = torch.where(
                ts >= 1, torch.full_like(ts, math.inf), self.c * (ts / (1 - ts).clamp_min(1e-12)) ** self.a
            )
            rows = self.distance_rows(flat[s : s + step])
            logits = torch.where(
                torch.isinf(beta)[:, None], torch.where(rows == 0, 0.0, -math.inf), -beta[:, None] * rows
            )
            draws = torch.multinomial(torch.softmax(logits, -1), 1, generator=generator)
            out[s : s + step] = draws.squeeze(-1)
        return out.view(x1.shape)

    def _step_scalars(self, t, h, like) -> tuple[float, float, bool]:
        t, h = _scalar(t, "t"), _scalar(h, "h")
        as_time(t, like)
        if not (math.isfinite(h) and h > 0):
            raise ValueError(f"step size h must be > 0, got {h!r}")
        if t + h > 1 + LAST_STEP_ATOL:
            raise ValueError(f"step t + h must not pass 1 (t={t}, h={h})")
        return t, h, t + h >= 1 - LAST_STEP_ATOL

    def kernel_log_prob(self, x_t, x_next, x1, t, h):
        for name, v in (("x_t", x_t), ("x_next", x_next), ("x1", x1)):
            self.check_tokens(v, name)
        t, h, last = self._step_scalars(t, h, x_t)
        x, y, x1 = torch.broadcast_tensors(x_t, x_next, x1)
        zero = torch.zeros(x.shape, dtype=self.dtype, device=x.device)
        if last:
            return torch.where(y == x1, zero, -math.inf)
        if self.beta_dot(t) == 0:
            return torch.where(y == x, zero, -math.inf)
        lam = self.exit_rate(x, x1, t)
        log_p_y = -self.beta(t) * self.pair_distance(y, x1) - self.log_normalizer(x1, t)
        gap = (self.pair_distance(x, x1) - self.pair_distance(y, x1)).clamp_min(0)
        log_jump = (
            log_p_y + math.log(self.beta_dot(t)) + gap.log() - lam.log() + torch.log(-torch.expm1(-h * lam))
        )
        log_jump = torch.where((lam > 0) & (gap > 0), log_jump, -math.inf)
        return torch.where(y == x, -h * lam, log_jump)

    def sample_kernel(self, x_t, x1, t, h, generator=None):
        self.check_tokens(x_t, "x_t")
        self.check_tokens(x1, "x1")
        t, h, last = self._step_scalars(t, h, x_t)
        x, x1 = torch.broadcast_tensors(x_t, x1)
        if last:
            return x1.clone()
        if self.beta_dot(t) == 0:
            return x.clone()
        lam = self.exit_rate(x, x1, t)
        u0 = torch.rand(x.shape, generator=generator, device=x.device, dtype=self.dtype)
        jump = u0 < -torch.expm1(-h * lam)
        out = x.clone()
        idx = torch.nonzero(jump.reshape(-1)).flatten()
        xs, x1s = x.reshape(-1)[idx], x1.reshape(-1)[idx]
        new, beta, step = torch.empty_like(xs), self.beta(t), self._chunk(self.vocab_size)
        for s in range(0, idx.numel(), step):
            rows = self.distance_rows(x1s[s : s + step])
            dx = rows.gather(1, xs[s : s + step, None])
            w = torch.softmax(-beta * rows, -1) * (dx - rows).clamp_min(0)
            new[s : s + step] = torch.multinomial(w, 1, generator=generator).squeeze(-1)
        out.view(-1)[idx] = new
        return out

    def step_log_prob(self, posterior_probs, x_t, x_next, t, h):
        """Exact ``log Σ_{x1} p(x1) K_h(x_t → x_next | x1)``: a full pass over all V values of x1.

        Cost ``O(V^2)`` per unique ``x_t``; meant as the reference for small V and for a handful of
        positions at large V (use the ``monte_carlo`` or ``top_k`` estimators for full canvases)."""
        self.check_posterior(posterior_probs)
        self.check_tokens(x_t, "x_t")
        self.check_tokens(x_next, "x_next")
        t, h, last = self._step_scalars(t, h, x_t)
        posterior_probs, x_t, x_next = self.broadcast_step(posterior_probs, x_t, x_next)
        out_dtype = posterior_probs.dtype
        probs = posterior_probs.to(self.dtype)
        x, y = torch.broadcast_tensors(x_t, x_next)
        if last:
            return probs.gather(-1, y.unsqueeze(-1)).squeeze(-1).log().to(out_dtype)
        if self.beta_dot(t) == 0:
            return (probs.sum(-1) * (y == x)).log().to(out_dtype)
        shape = x.shape
        p = probs.reshape(-1, self.vocab_size)
        x, y = x.reshape(-1), y.reshape(-1)
        ux, inv = torch.unique(x, return_inverse=True)
        beta, bdot = self.beta(t), self.beta_dot(t)
        total = torch.zeros(x.numel(), dtype=self.dtype, device=x.device)
        step = self._chunk(self.vocab_size * ux.numel())
        for s in range(0, self.vocab_size, step):
            cand = torch.arange(s, min(s + step, self.vocab_size), device=x.device)
            rows = self.distance_rows(cand)  # (C, V): d(·, x1) for each candidate x1
            logp = torch.log_softmax(-beta * rows, -1)
            d_ux = rows[:, ux]  # (C, U)
            lam = bdot * (logp.exp()[:, None, :] * (d_ux[:, :, None] - rows[:, None, :]).clamp_min(0)).sum(-1)
            lam = lam[:, inv]  # (C, P)
            d_x, d_y = rows[:, x], rows[:, y]
            u = logp[:, y].exp() * bdot * (d_x - d_y).clamp_min(0)
            jump = torch.where(
                lam > 0, u / lam.clamp_min(1e-300) * -torch.expm1(-h * lam), torch.zeros_like(u)
            )
            kern = torch.where((y == x)[None, :], torch.exp(-h * lam), jump)  # (C, P)
            total = total + (p[:, s : s + step] * kern.T).sum(-1)
        return total.log().view(shape).to(out_dtype)

    def moves_at(self, t: float, h: float) -> bool:
        return t + h >= 1 - LAST_STEP_ATOL or self.beta_dot(t) > 0
