"""Time and peak memory of one rollout step and of each estimator at FUDOKI's shape, on CPU.

FUDOKI's image canvas: D = 576 positions, V = 16384 codes, 8-dim VQ embeddings, the metric-induced
path, n = 24 posterior draws. Each configuration runs in its own process, so peak RSS is its own.

    python benchmarks/estimators.py            # the table (B = 1, 4)
    python benchmarks/estimators.py --batch 1 --repeats 3
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

D, V, E = 576, 16384, 8


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_one(what: str, batch: int, repeats: int) -> dict:
    import torch

    from dflow_trl.likelihood import get_estimator
    from dflow_trl.paths import MetricInducedPath

    torch.manual_seed(0)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    path = MetricInducedPath(torch.randn(V, E))
    logits = torch.randn(batch, D, V) * 4  # a peaked posterior, as a trained model's mid-trajectory
    probs = torch.softmax(logits, -1)
    x_t = path.sample_source((batch, D))
    t, h = 0.5, 0.125
    est_name = what.split(":")[1] if what.startswith(("rollout", "estimate")) else "monte_carlo"
    est = get_estimator(est_name, num_draws=24 if est_name == "monte_carlo" else 8, top_k=16)
    base = _rss_mb()
    times = []
    if what.startswith("rollout"):
        for _ in range(repeats):
            t0 = time.perf_counter()
            est.record(path, probs, x_t, t, h)
            times.append(time.perf_counter() - t0)
    elif what == "exact:4pos":
        sub = probs[0, :4].double()
        y = path.sample_kernel(x_t[0, :4], torch.multinomial(sub.float(), 1).squeeze(-1), t, h)
        for _ in range(repeats):
            t0 = time.perf_counter()
            path.step_log_prob(sub, x_t[0, :4], y, t, h)
            times.append(time.perf_counter() - t0)
    else:
        rec = est.record(path, probs, x_t, t, h)
        base = _rss_mb()
        for _ in range(repeats):
            lg = logits.clone().requires_grad_(True)
            t0 = time.perf_counter()
            lp = est.step_log_prob(path, rec, torch.log_softmax(lg, -1), t, h)
            lp.mean().backward()
            times.append(time.perf_counter() - t0)
    return {"what": what, "batch": batch, "seconds": min(times), "peak_extra_mb": _rss_mb() - base}


CONFIGS = [
    ("rollout:monte_carlo", "rollout step, records n=24 draws"),
    ("rollout:top_k", "rollout step, records k=16 head + n=8 draws"),
    ("estimate:monte_carlo", "monte_carlo estimator fwd+bwd (n=24)"),
    ("estimate:top_k", "top_k estimator fwd+bwd (k=16, n=8)"),
    ("estimate:posterior_only", "posterior_only fwd+bwd"),
    ("exact:4pos", "exact step_log_prob, 4 positions (reference)"),
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, nargs="*", default=[1, 4])
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--one", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.one:
        print(json.dumps(run_one(a.one, a.batch[0], a.repeats)))
        return
    import platform

    import torch

    print(
        f"CPU: {platform.processor() or platform.machine()}, torch {torch.__version__}, "
        f"threads {torch.get_num_threads()}"
    )
    print(f"shape: D={D}, V={V}, E={E}, metric path, t=0.5, h=1/8\n")
    print(f"| {'what':<48} | B | seconds | peak extra MB |")
    print(f"|{'-' * 50}|---|---------|---------------|")
    for what, label in CONFIGS:
        for b in a.batch:
            if what == "exact:4pos" and b != a.batch[0]:
                continue
            out = subprocess.run(
                [sys.executable, __file__, "--one", what, "--batch", str(b), "--repeats", str(a.repeats)],
                capture_output=True, text=True, check=True,
            )
            r = json.loads(out.stdout.strip().splitlines()[-1])
            print(f"| {label:<48} | {b} | {r['seconds']:7.2f} | {r['peak_extra_mb']:13.0f} |", flush=True)


if __name__ == "__main__":
    main()
