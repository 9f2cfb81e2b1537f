"""Shared test helpers: small paths and independent brute-force references."""

from __future__ import annotations

import math
import subprocess
import sys

import torch

from dflow_trl.paths import MetricInducedPath, MixturePath

V_SMALL = 6


def small_paths(vocab: int = V_SMALL) -> dict[str, object]:
    g = torch.Generator().manual_seed(3)
    return {
        "mask": MixturePath(vocab, source="mask", mask_token_id=vocab - 1, scheduler=2.0),
        "uniform": MixturePath(vocab, source="uniform", scheduler=1.0),
        "metric": MetricInducedPath(torch.randn(vocab, 3, generator=g), c=3.0, a=0.9),
    }


def brute_kernel(path, x: int, y: int, x1: int, t: float, h: float) -> float:
    """K_h(x → y | x1) written directly from docs/method.md §2 with Python loops (float64)."""
    V = path.vocab_size
    if isinstance(path, MixturePath):
        k0, k1 = t ** path.scheduler.exponent, (t + h) ** path.scheduler.exponent
        q = 1.0 if t + h >= 1 - 1e-9 else (k1 - k0) / (1 - k0)
        if path.source == "mask" and x != path.mask_token_id:
            q = 0.0
        return (1 - q) * (y == x) + q * (y == x1)
    if t + h >= 1 - 1e-9:
        return float(y == x1)
    e = torch.nn.functional.normalize(path.unit.double(), dim=-1).tolist()

    def d(i: int, j: int) -> float:
        return sum((a - b) ** 2 for a, b in zip(e[i], e[j])) ** 2

    beta = 0.0 if t == 0 else path.c * (t / (1 - t)) ** path.a
    bdot = 0.0 if t == 0 else path.c * path.a * (t / (1 - t)) ** (path.a - 1) / (1 - t) ** 2
    w = [math.exp(-beta * d(v, x1)) for v in range(V)]
    z = sum(w)
    u = [w[v] / z * bdot * max(d(x, x1) - d(v, x1), 0.0) if v != x else 0.0 for v in range(V)]
    lam = sum(u)
    if lam == 0:
        return float(y == x)
    return math.exp(-h * lam) if y == x else u[y] / lam * (1 - math.exp(-h * lam))


def brute_step_prob(path, probs: list[float], x: int, y: int, t: float, h: float) -> float:
    return sum(p * brute_kernel(path, x, y, x1, t, h) for x1, p in enumerate(probs))


def random_posterior(
    shape: tuple[int, ...], vocab: int, seed: int, temperature: float = 1.0, block: int | None = None
):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(*shape, vocab, generator=g, dtype=torch.float64) * 1.5 / temperature
    if block is not None:
        logits[..., block] = -math.inf
    return torch.softmax(logits, -1)


def assert_fresh_python_prints_ok(code: str, timeout: float = 300) -> None:
    """Run ``code`` in a fresh interpreter (nothing imported yet) and require it to print ``ok``."""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"
