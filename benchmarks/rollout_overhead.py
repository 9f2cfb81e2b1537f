"""Wall time of a recorded rollout against the bare model forwards it cannot avoid.

For each model and estimator, one rollout of K Euler steps on a batch of B prompts
(:func:`dflow_trl.rollout.rollout`, recording what the estimator scores) is timed against K bare
model forwards on the same canvases at the same times (the floor). With CFG (``w ≠ 0``) the floor is
K forwards of the 2B conditional + unconditional rows when the rollout batches them (the default),
and 2K forwards of B rows when it does not (``--unbatched-cfg`` adds those rows). Everything runs in
one process on one thread; the rollouts and floors of all settings are interleaved, and each time is
the minimum over the repeats, so a noisy neighbour inflates both alike.

Models: ``shapeworld``, the shipped demo model (metric path, V = 9, D = 256, 1M parameters), and
``random``, a randomly initialised DFM of the same layout with ``--hidden``/``--layers`` (512/6:
about 23M parameters) and ``--vocab`` (1024) image tokens on a metric path over random
8-dimensional embeddings, so that the recording's V-sized work shows. Estimators: ``top_k`` (head
``min(--top-k, V // 2)``, ``--tail-draws`` draws), ``monte_carlo`` (``--mc-draws`` draws),
``posterior_only`` and ``exact`` (only where the path makes it cheap).

    python benchmarks/rollout_overhead.py [--batch 4] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Callable
from typing import Any

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def build_model(name: str, vocab: int, hidden: int, layers: int) -> tuple[Any, Any]:
    """``(model, tokenizer)``: the shipped ShapeWorld model, or a random one in its layout."""
    from dflow_trl.models import DFMTransformer, DFMTransformerConfig
    from dflow_trl.tasks.shapeworld.pretrained import SHAPEWORLD_DIR, load_shapeworld_model

    model, tok = load_shapeworld_model("t2i")
    if name == "shapeworld":
        return model, tok
    torch.manual_seed(0)
    cfg = DFMTransformerConfig.from_pretrained(SHAPEWORLD_DIR)
    cfg.hidden_size, cfg.num_hidden_layers = hidden, layers
    cfg.num_attention_heads, cfg.intermediate_size = max(1, hidden // 64), 3 * hidden
    cfg.image_vocab_size, cfg.palette = vocab, None
    emb = torch.randn(vocab, 8, generator=torch.Generator().manual_seed(0))
    cfg.image_path = {"type": "metric", "c": 3.0, "a": 0.9, "embeddings": emb.tolist()}
    return DFMTransformer(cfg).eval(), tok


def make_estimator(name: str, vocab: int, top_k: int, tail_draws: int, mc_draws: int) -> Any:
    from dflow_trl.likelihood import get_estimator

    if name == "top_k":
        return get_estimator("top_k", num_draws=tail_draws, top_k=max(1, min(top_k, vocab // 2)))
    return get_estimator(name, num_draws=mc_draws)


def describe(estimator: Any) -> str:
    if estimator.name == "top_k":
        return f"top_k (k={estimator.head_size}, n={estimator.num_draws})"
    if estimator.name == "monte_carlo":
        return f"monte_carlo (n={estimator.num_draws})"
    return estimator.name


def timers(
    model: Any, batch: Any, path: Any, estimator: Any, steps: int, cfg: float, batched: bool, seed: int
) -> tuple[Callable[[], float], Callable[[], float]]:
    """``(rollout_seconds, floor_seconds)``: one timed rollout, and K (or 2K) bare forwards on that
    rollout's own canvases."""
    from dflow_trl.rollout import flow_logits, rollout

    states: list[torch.Tensor] = []

    def run_rollout() -> float:
        gen = torch.Generator().manual_seed(seed)
        t0 = time.perf_counter()
        traj = rollout(
            model, batch, path, steps, cfg_scale=cfg, estimator=estimator, generator=gen, batch_cfg=batched
        )
        seconds = time.perf_counter() - t0
        states[:] = [traj.states, traj.times]
        return seconds

    def run_floor() -> float:
        if not states:
            run_rollout()
        canvases, times = states
        both = batch.with_unconditional_rows() if cfg != 0 and batched else None
        with torch.no_grad():
            t0 = time.perf_counter()
            for k in range(steps):
                x, t = canvases[:, k], float(times[k])
                if both is not None:
                    flow_logits(model, both, torch.cat([x, x]), t=t)
                    continue
                flow_logits(model, batch, x, t=t)
                if cfg != 0:
                    flow_logits(model, batch, x, unconditional=True, t=t)
            return time.perf_counter() - t0

    return run_rollout, run_floor


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["shapeworld", "random"], choices=["shapeworld", "random"])
    ap.add_argument(
        "--estimators", nargs="+", default=["top_k", "monte_carlo", "posterior_only", "exact"],
        help="exact is skipped on paths where it is not cheap",
    )  # fmt: skip
    ap.add_argument("--batch", type=int, nargs="+", default=[4])
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--cfg", type=float, nargs="+", default=[0.0, 3.0], help="CFG scales w (0: none)")
    ap.add_argument("--unbatched-cfg", action="store_true", help="also time CFG as two forwards per step")
    ap.add_argument("--vocab", type=int, default=1024)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--top-k", type=int, default=16)
    ap.add_argument("--tail-draws", type=int, default=8)
    ap.add_argument("--mc-draws", type=int, default=24)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    torch.set_num_threads(1)

    settings = []
    for name in a.models:
        model, tok = build_model(name, a.vocab, a.hidden, a.layers)
        path = model.get_probability_path()
        params = sum(p.numel() for p in model.parameters()) / 1e6
        for b in a.batch:
            batch = model.prepare_flow_inputs(["a red square left of a blue circle"] * b, tok)
            for est_name in a.estimators:
                est = make_estimator(est_name, path.vocab_size, a.top_k, a.tail_draws, a.mc_draws)
                try:
                    est.check_path(path)
                except ValueError:
                    continue
                for cfg in a.cfg:
                    for batched in [True, False] if cfg != 0 and a.unbatched_cfg else [True]:
                        row = {
                            "model": name, "params_M": round(params, 1), "V": path.vocab_size,
                            "D": batch.canvas_length, "estimator": describe(est), "cfg": cfg,
                            "cfg_forward": "none" if cfg == 0 else ("batched" if batched else "two passes"),
                            "B": b, "K": a.steps,
                        }  # fmt: skip
                        fns = timers(model, batch, path, est, a.steps, cfg, batched, seed=len(settings))
                        settings.append((row, *fns))
    for _, roll, floor in settings:  # warm-up
        roll(), floor()
    times: list[tuple[list[float], list[float]]] = [([], []) for _ in settings]
    for rep in range(a.reps):
        for i, (_, roll, floor) in enumerate(settings):
            times[i][0].append(roll())
            times[i][1].append(floor())
        print(f"repeat {rep + 1}/{a.reps} done", flush=True)
    rows = []
    for (row, _, _), (roll_s, floor_s) in zip(settings, times):
        row = dict(row, rollout_s=round(min(roll_s), 4), floor_s=round(min(floor_s), 4))
        row["ratio"] = round(min(roll_s) / min(floor_s), 2)
        rows.append(row)
    lines = [
        "| model | estimator | cfg | B | rollout s | floor s | × floor |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        cfg = "off" if r["cfg"] == 0 else f"w = {r['cfg']:g}, {r['cfg_forward']}"
        model = f"{r['model']} ({r['params_M']}M, V = {r['V']})"
        cells = [model, r["estimator"], cfg, r["B"], f"{r['rollout_s']:.3f}", f"{r['floor_s']:.3f}"]
        cells.append(r["ratio"])
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    print("\n".join(lines))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
