"""The paper's comparison on ShapeWorld: dFlowGRPO estimators vs the diffu-GRPO (d1) baseline.

Same shipped base, same prompts, same number of optimizer steps and the same seeds for every
method; training rollouts use K = 8 Euler steps. Methods: ``monte_carlo`` and ``top_k``
(dFlowGRPO), ``top_k+greedy`` (``top_k`` with ``step_baseline="greedy"``) and ``posterior_only``
(diffu-GRPO).

``--mode heldout`` runs the demo per method and seed (LoRA on the balanced training prompts, the
demo's evaluation: 24 held-out prompts per category × 4 samples at K = 8 unless overridden) and
reports the held-out strict GenEval-style score per category (mean [min, max] over seeds):

    python benchmarks/shapeworld_compare.py --mode heldout --seeds 0 1 2 --max-steps 40

``--reward placebo`` trains on a coin flip per sample instead (a placebo: its true policy gradient is
zero), so the held-out change is the noise damage alone that a real run pays on top of its signal.

``--mode prompt`` trains on one training prompt at a time (16 rollouts per step) and reports its
expected partial reward over ``--probe-samples`` seeded samples, before and after:

    python benchmarks/shapeworld_compare.py --mode prompt --seeds 0 1 2 --max-steps 12
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from dflow_trl.tasks.shapeworld import TAGS
from dflow_trl.tasks.shapeworld.demo import DEMO_DEFAULTS, build_parser, build_trainer, run

ESTIMATORS = ("monte_carlo", "top_k", "posterior_only")
# ``NAME+greedy``: the estimator with ``step_baseline="greedy"`` (docs/method.md §5).
METHODS = (*ESTIMATORS, "top_k+greedy")
# Training prompts the shipped base half-solves (shape hybrids; relation at chance).
HALF_SOLVED = ("a photo of a blue square and a red cross", "a photo of a diamond above a cross")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mode", choices=["heldout", "prompt"], default="heldout")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--estimators", nargs="+", default=list(ESTIMATORS), choices=list(METHODS))
    ap.add_argument(
        "--max-steps", type=int, default=None, help="optimizer steps (heldout: the demo's; prompt: 12)"
    )
    ap.add_argument(
        "--steps-for", nargs="+", default=[], metavar="METHOD=N",
        help="heldout: another step count for a method, e.g. posterior_only=63 to compare at equal "
        "training time (the table then reports each method's training seconds)",
    )
    ap.add_argument(
        "--eval-per-tag", type=int, default=None, help="heldout: prompts per category (default: the demo's)"
    )
    ap.add_argument(
        "--eval-samples", type=int, default=None, help="heldout: samples per prompt (default: the demo's)"
    )
    ap.add_argument(
        "--eval-steps", type=int, default=None, help="Euler steps of evaluation (default: the demo's)"
    )
    ap.add_argument(
        "--time-power", type=float, default=None, help="heldout: time grid power (default: the demo's)"
    )
    ap.add_argument(
        "--reward", default=None,
        help="heldout: training reward (default: the demo's); 'placebo' (a coin flip per sample) measures "
        "what the gradient's noise alone does to the held-out score",
    )
    ap.add_argument("--prompts", nargs="+", default=list(HALF_SOLVED), help="prompt: training prompts")
    ap.add_argument("--probe-samples", type=int, default=64, help="prompt: samples scored before and after")
    ap.add_argument(
        "--learning-rate", type=float, default=None, help="prompt: LoRA learning rate (default: the demo's)"
    )
    ap.add_argument("--output", default="benchmarks/results")
    a = ap.parse_args()
    out = Path(a.output)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    if a.mode == "heldout":
        rows = compare_heldout(a, out)
        table = format_table(rows)
        groups = {
            name: {
                c: [r["strict"] if c == "overall" else r["per_category"][c] for r in rs]
                for c in ("overall", *TAGS)
            }
            for name, rs in rows.items()
        }
        ylabel = "held-out strict score"
    else:
        rows = compare_on_prompts(a)
        table = format_prompt_table(rows)
        groups: dict[str, dict[str, list[float]]] = {"base": {}}
        for r in rows:
            label = r["prompt"].removeprefix("a photo of ")
            groups.setdefault(r["estimator"], {}).setdefault(label, []).append(r["after"])
            if r["estimator"] == a.estimators[0]:  # one base score per (prompt, seed), shared by the methods
                groups["base"].setdefault(label, []).append(r["before"])
        ylabel = "expected partial reward"
    (out / f"compare_{a.mode}.json").write_text(json.dumps(rows, indent=2))
    print(table)
    (out / f"compare_{a.mode}.md").write_text(table + f"\n\nwall time: {time.perf_counter() - t0:.0f} s\n")
    plot(groups, ylabel, out / f"compare_{a.mode}.png")


def compare_heldout(a: argparse.Namespace, out: Path) -> dict[str, list[dict]]:
    rows: dict[str, list[dict]] = {"base": []}
    bases: dict[int, dict] = {}
    steps_for = dict(item.split("=", 1) for item in a.steps_for)
    unknown = sorted(set(steps_for) - set(a.estimators))
    if unknown:
        raise SystemExit(f"--steps-for names methods not in --estimators: {unknown}")
    for seed in a.seeds:
        for est in a.estimators:
            overrides = {
                "--eval-per-tag": a.eval_per_tag, "--eval-samples": a.eval_samples,
                "--eval-steps": a.eval_steps, "--time-power": a.time_power, "--reward": a.reward,
            }  # fmt: skip
            estimator, _, baseline = est.partition("+")
            args = build_parser().parse_args([
                "--output-dir", str(out / f"{est}-seed{seed}"), "--estimator", estimator, "--seed", str(seed),
                "--step-baseline", baseline or "none",
                "--max-steps", steps_for.get(est, str(a.max_steps or DEMO_DEFAULTS["t2i"]["max_steps"])),
                "--train-minutes", "1000",
                *[str(x) for flag, v in overrides.items() if v is not None for x in (flag, v)],
            ])  # fmt: skip
            res = run(args, base=bases.get(seed))
            if seed not in bases:
                bases[seed] = res["base"]
                rows["base"].append(res["base"])
            rows.setdefault(est, []).append(
                {**res["final"], "train_seconds": res["train_seconds"], "steps": res["steps"]}
            )
            print(
                f"[compare] {est} seed {seed}: {res['base_score']:.3f} -> {res['final_score']:.3f}",
                flush=True,
            )
    return rows


def compare_on_prompts(a: argparse.Namespace) -> list[dict]:
    import torch
    from datasets import Dataset

    from dflow_trl.tasks.shapeworld import all_prompts
    from dflow_trl.tasks.shapeworld.evaluation import evaluate_t2i
    from dflow_trl.tasks.shapeworld.pretrained import load_shapeworld_model

    eval_steps = a.eval_steps or DEMO_DEFAULTS["t2i"]["eval_steps"]
    metas = {m["prompt"]: m for m in all_prompts()}
    unknown = [p for p in a.prompts if p not in metas]
    if unknown:
        raise SystemExit(f"not ShapeWorld prompts: {unknown}")
    rows = []
    for prompt in a.prompts:
        row = {"prompt": prompt, "tag": metas[prompt]["tag"], "metadata": json.dumps(metas[prompt])}
        probe = Dataset.from_list([row] * a.probe_samples)
        for seed in a.seeds:
            before = None
            for est in a.estimators:
                torch.manual_seed(seed)
                model, tok = load_shapeworld_model("t2i")
                if before is None:
                    before = evaluate_t2i(
                        model, tok, probe, num_steps=eval_steps, seeds=(1000 + seed,)
                    )["partial"]
                estimator, _, baseline = est.partition("+")
                cfg = {
                    **DEMO_DEFAULTS["t2i"], "per_device_train_batch_size": 16, "max_steps": a.max_steps or 12,
                    "estimator": estimator, "step_baseline": baseline or "none",
                }  # fmt: skip
                if a.learning_rate is not None:
                    cfg["learning_rate"] = a.learning_rate
                trainer = build_trainer(
                    model, tok, Dataset.from_list([row] * 16), cfg, Path(a.output) / "trainer", seed
                )
                t = time.perf_counter()
                trainer.train()
                seconds = time.perf_counter() - t
                after = evaluate_t2i(
                    trainer.model, tok, probe, num_steps=eval_steps, seeds=(1000 + seed,)
                )["partial"]
                rows.append({
                    "prompt": prompt, "estimator": est, "seed": seed, "before": before, "after": after,
                    "train_seconds": seconds,
                })  # fmt: skip
                print(
                    f"[compare] {prompt!r} {est} seed {seed}: {before:.3f} -> {after:.3f} ({seconds:.0f} s)",
                    flush=True,
                )
    return rows


def _stats(vals: list[float]) -> str:
    m = sum(vals) / len(vals)
    return f"{m:.2f} [{min(vals):.2f}, {max(vals):.2f}]"


def format_table(rows: dict[str, list[dict]]) -> str:
    head = "| method | steps | training s | overall | " + " | ".join(TAGS) + " |"
    lines = [head, "|" + "---|" * (len(TAGS) + 4)]
    for name, results in rows.items():
        steps = sorted({r["steps"] for r in results if "steps" in r})
        secs = [r["train_seconds"] for r in results if "train_seconds" in r]
        cells = [",".join(map(str, steps)) or "–", f"{sum(secs) / len(secs):.0f}" if secs else "–"]
        cells += [_stats([r["strict"] for r in results])]
        cells += [_stats([r["per_category"][t] for r in results]) for t in TAGS]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def format_prompt_table(rows: list[dict]) -> str:
    lines = ["| prompt | method | before | after | training seconds |", "|---|---|---|---|---|"]
    keys = dict.fromkeys((r["prompt"], r["estimator"]) for r in rows)
    for prompt, est in keys:
        rs = [r for r in rows if r["prompt"] == prompt and r["estimator"] == est]
        secs = sum(r["train_seconds"] for r in rs) / len(rs)
        cells = [_stats([r["before"] for r in rs]), _stats([r["after"] for r in rs]), f"{secs:.0f}"]
        lines.append(f"| {prompt.removeprefix('a photo of ')} | {est} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(groups: dict[str, dict[str, list[float]]], ylabel: str, path: Path) -> None:
    """Grouped bars: one group per x label, one bar per method (mean, whiskers at min and max)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = list(next(iter(groups.values())))
    fig, ax = plt.subplots(figsize=(max(5, 1.4 * len(labels) + 2), 3.5), dpi=120)
    width = 0.8 / len(groups)
    for i, (name, by_label) in enumerate(groups.items()):
        vals = [by_label[c] for c in labels]
        means = [sum(v) / len(v) for v in vals]
        err = [[m - min(v) for m, v in zip(means, vals)], [max(v) - m for m, v in zip(means, vals)]]
        ax.bar([j + i * width for j in range(len(labels))], means, width, yerr=err, label=name, capsize=2)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(labels))], labels, rotation=15, fontsize=8)
    ax.set_ylabel(ylabel)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)


if __name__ == "__main__":
    main()
