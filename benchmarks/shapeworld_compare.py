"""The paper's comparison on ShapeWorld: dFlowGRPO estimators vs the diffu-GRPO (d1) baseline.

Same shipped base, same training prompts, same number of optimizer steps and the same seeds for
every method; training rollouts use K = 8 steps and evaluation K = 20, as in the paper. For each
estimator (``monte_carlo``, ``top_k``, ``posterior_only`` = diffu-GRPO) and seed, LoRA is trained
from the base and the held-out strict GenEval-style score is measured per category.

    python benchmarks/shapeworld_compare.py --seeds 0 1 2 --max-steps 40 --output benchmarks/results
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from dflow_trl.data import TAGS
from dflow_trl.demo import build_parser, run

ESTIMATORS = ("monte_carlo", "top_k", "posterior_only")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--estimators", nargs="+", default=list(ESTIMATORS))
    ap.add_argument("--max-steps", type=int, default=40)
    ap.add_argument("--eval-per-tag", type=int, default=12)
    ap.add_argument("--eval-steps", type=int, default=20)
    ap.add_argument("--output", default="benchmarks/results")
    a = ap.parse_args()
    out = Path(a.output)
    out.mkdir(parents=True, exist_ok=True)
    rows: dict[str, list[dict]] = {"base": []}
    bases: dict[int, dict] = {}
    t0 = time.perf_counter()
    for seed in a.seeds:
        for est in a.estimators:
            args = build_parser().parse_args([
                "--output-dir", str(out / f"{est}-seed{seed}"), "--estimator", est, "--seed", str(seed),
                "--max-steps", str(a.max_steps), "--train-minutes", "1000",
                "--eval-per-tag", str(a.eval_per_tag), "--eval-steps", str(a.eval_steps),
            ])
            res = run(args, base=bases.get(seed))
            if seed not in bases:
                bases[seed] = res["base"]
                rows["base"].append(res["base"])
            rows.setdefault(est, []).append(res["final"])
            print(f"[compare] {est} seed {seed}: {res['base_score']:.3f} -> {res['final_score']:.3f}", flush=True)
    (out / "compare.json").write_text(json.dumps(rows, indent=2))
    table = format_table(rows)
    print(table)
    (out / "compare.md").write_text(table + f"\n\nwall time: {time.perf_counter() - t0:.0f} s\n")
    plot(rows, out / "compare.png")


def _stats(vals: list[float]) -> str:
    m = sum(vals) / len(vals)
    return f"{m:.2f} [{min(vals):.2f}, {max(vals):.2f}]"


def format_table(rows: dict[str, list[dict]]) -> str:
    head = "| method | overall | " + " | ".join(TAGS) + " |"
    lines = [head, "|" + "---|" * (len(TAGS) + 2)]
    for name, results in rows.items():
        cells = [_stats([r["strict"] for r in results])]
        cells += [_stats([r["per_category"][t] for r in results]) for t in TAGS]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(rows: dict[str, list[dict]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cats = ["strict", *TAGS]
    fig, ax = plt.subplots(figsize=(9, 3.5), dpi=120)
    width = 0.8 / len(rows)
    for i, (name, results) in enumerate(rows.items()):
        means, lo, hi = [], [], []
        for c in cats:
            vals = [r["strict"] if c == "strict" else r["per_category"][c] for r in results]
            m = sum(vals) / len(vals)
            means.append(m)
            lo.append(m - min(vals))
            hi.append(max(vals) - m)
        xs = [j + i * width for j in range(len(cats))]
        ax.bar(xs, means, width, yerr=[lo, hi], label=name, capsize=2)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(cats))], ["overall", *TAGS], rotation=20, fontsize=8)
    ax.set_ylabel("held-out strict score")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)


if __name__ == "__main__":
    main()
