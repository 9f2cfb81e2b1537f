"""How much signal one batch's dFlowGRPO gradient carries, per estimator, on the shipped ShapeWorld model.

For a training prompt, draw R independent batches of N rollouts (N/G groups of G), compute each
batch's GRPO loss gradient exactly as ``DFlowGRPOTrainer`` does, and report the mean pairwise
cosine between the R batch gradients. Write one rollout's contribution as s + ε (signal s, zero-
mean noise ε of variance σ²); then for large dimension E[cos] ≈ N‖s‖² / (N‖s‖² + σ²), so

    ρ = ‖s‖² / σ² ≈ cos / (N (1 − cos))

is the per-rollout signal-to-noise ratio, and about 1/ρ rollouts make one gradient whose signal
equals its noise. cos ≈ 0 means the batch gradient is mostly noise: the optimizer then needs many
more steps (or larger batches) before the reward moves.

A method is an estimator name, optionally with ``+branch`` (``rollout_branching``: one trained step
per rollout, step-level credit) and/or ``+greedy`` (``step_baseline="greedy"``: step k's advantage
takes the reward of the posterior's prediction at x_k as its baseline) or ``+td`` (the same values
as TD(0) credit, ``step_baseline_lambda=0``: biased) or ``+rollouts`` (``step_baseline="rollouts"``:
the baseline is the mean reward of ``--baseline-rollouts`` fresh continuations of x_k) and/or
``+shared`` (``shared_source``: each group starts from one x_0). ``seconds`` is the wall
time of the setting's R gradients, so ρ per second compares methods of different cost.

    python benchmarks/gradient_snr.py --estimators top_k top_k+greedy top_k+branch posterior_only \\
        --json out.json

Where do two methods' gradients point? For each prompt the script also reports, for every pair of
methods, the cosine between their mean gradients (over all R batches), and that cosine divided by
``c_a c_b`` with ``c = sqrt(n ρ / (1 + n ρ))`` (n = R × rollouts per gradient), the cosine a mean of
n rollouts is expected to have with its own expectation: an estimate of the cosine between the two
methods' expected gradients. An unbiased method's expected gradient is ∇E[R], so for a pair of an
unbiased method and a biased one this is the biased gradient's alignment with ∇E[R] (noisy where
``c`` is small; ``null`` where a ρ is 0). The JSON holds ``{"rows": [...], "alignment": [...]}``
(results from before the alignment are a bare list of rows).
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import time
from pathlib import Path

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")


def batch_gradients(
    method: str, prompt_row: dict, args: argparse.Namespace, accumulate: int
) -> tuple[torch.Tensor, list[float], dict[str, float]]:
    """``(R, P)`` gradients of R independent batches (each ``accumulate`` × ``--batch`` rollouts), their
    mean rewards, and per step the share of the advantage's variance a step baseline removed."""
    estimator, *variants = method.split("+")
    if not set(variants) <= {"branch", "greedy", "td", "rollouts", "shared"}:
        raise SystemExit(
            f"unknown method {method!r}: use an estimator name, NAME+branch, NAME+greedy, NAME+td, "
            "NAME+rollouts or NAME+shared"
        )
    baseline = "greedy" if {"greedy", "td"} & set(variants) else "none"
    if "rollouts" in variants:
        baseline = "rollouts"
    from datasets import Dataset

    from dflow_trl.rewards import get_reward_function
    from dflow_trl.tasks.shapeworld.pretrained import load_shapeworld_model
    from dflow_trl.trainer import DFlowGRPOConfig, DFlowGRPOTrainer

    torch.manual_seed(args.seed)
    model, tok = load_shapeworld_model("t2i", args.model)
    cfg = DFlowGRPOConfig(
        output_dir=str(Path(args.output) / "trainer"),
        use_cpu=True,
        bf16=False,
        per_device_train_batch_size=args.batch,
        num_generations=args.num_generations,
        max_steps=1,
        num_flow_steps=args.num_flow_steps,
        estimator=estimator,
        num_mc_samples=8,
        top_k_size=4,
        include_last_step=True,
        rollout_branching="branch" in variants,
        shared_source="shared" in variants,
        step_baseline=baseline,
        step_baseline_rollouts=args.baseline_rollouts,
        step_baseline_lambda=0.0 if "td" in variants else 1.0,
        flow_time_power=args.time_power,
        report_to="none",
        seed=args.seed,
    )
    trainer = DFlowGRPOTrainer(
        model=model,
        reward_funcs=get_reward_function(args.reward),
        args=cfg,
        train_dataset=Dataset.from_list([prompt_row]),
        processing_class=tok,
    )
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = 1  # set by the training loop, which is not run here
    params = [p for p in trainer.model.parameters() if p.requires_grad]
    grads, rewards = [], []
    for _ in range(args.reps):
        trainer.model.zero_grad(set_to_none=True)
        for _ in range(accumulate):
            batch = trainer._generate_and_score_completions([prompt_row] * args.batch)
            trainer.compute_loss(trainer.model, batch).backward()
            rewards.append(trainer._metrics["train"]["reward"][-1])
        grads.append(torch.cat([p.grad.flatten() for p in params if p.grad is not None]))
    explained = {
        key.rsplit("_", 1)[-1]: sum(v) / len(v)
        for key, v in trainer._metrics["train"].items()
        if key.startswith("flow/baseline_explained/") and v
    }
    return torch.stack(grads), rewards, explained


def mean_pairwise_cosine(grads: torch.Tensor) -> float:
    pairs = itertools.combinations(range(grads.shape[0]), 2)
    cos = [torch.nn.functional.cosine_similarity(grads[i], grads[j], dim=0).item() for i, j in pairs]
    return sum(cos) / len(cos)


def alignment(means: dict[tuple[str, str, int], tuple[torch.Tensor, float]]) -> list[dict]:
    """Per prompt and pair of settings: the cosine of their mean gradients, raw and divided by
    ``c_a c_b`` (``c = sqrt(m / (1 + m))``, ``m`` = rollouts in the mean × ρ; None where m = 0)."""
    out = []
    for (ka, (ga, ma)), (kb, (gb, mb)) in itertools.combinations(means.items(), 2):
        if ka[0] != kb[0]:
            continue
        cos = torch.nn.functional.cosine_similarity(ga, gb, dim=0).item()
        scale = math.sqrt(ma / (1 + ma) * mb / (1 + mb))
        name = lambda key: key[1] if key[2] == 1 else f"{key[1]}×{key[2]}"  # noqa: E731
        out.append({
            "prompt": ka[0], "a": name(ka), "b": name(kb), "cosine": cos,
            "corrected": None if scale == 0 else cos / scale,
        })  # fmt: skip
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--estimators", nargs="+", default=["top_k", "exact", "monte_carlo", "posterior_only"])
    ap.add_argument("--accumulate", type=int, nargs="+", default=[1], help="batches summed into one gradient")
    ap.add_argument(
        "--prompts", nargs="+",
        default=["a photo of a square left of a circle", "a photo of a blue square and a red cross"],
    )
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--baseline-rollouts", type=int, default=2, help="continuations per step of +rollouts")
    ap.add_argument("--num-generations", type=int, default=8)
    ap.add_argument("--num-flow-steps", type=int, default=8)
    ap.add_argument("--reps", type=int, default=4, help="independent gradients per setting (R)")
    ap.add_argument("--reward", default="shapeworld_partial", help="training reward (a registered name)")
    ap.add_argument("--time-power", type=float, default=1.0, help="time grid t_k = (k/K)^power")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--model", default=None, help="model folder (default: the shipped ShapeWorld model)")
    ap.add_argument("--output", default="benchmarks/results/gradient_snr")
    ap.add_argument("--json", default=None, help="also write the table as JSON to this path")
    a = ap.parse_args()
    if a.reps < 2:
        ap.error("--reps must be >= 2 (the cosine needs a pair)")
    from dflow_trl.tasks.shapeworld import all_prompts

    by_prompt = {m["prompt"]: m for m in all_prompts()}
    unknown = [p for p in a.prompts if p not in by_prompt]
    if unknown:
        ap.error(f"not ShapeWorld prompts: {unknown}")
    out = Path(a.output)
    out.mkdir(parents=True, exist_ok=True)
    rows, means = [], {}
    for prompt, est, acc in itertools.product(a.prompts, a.estimators, a.accumulate):
        meta = by_prompt[prompt]
        row = {"prompt": prompt, "tag": meta["tag"], "metadata": json.dumps(meta)}
        t0 = time.perf_counter()
        grads, rewards, explained = batch_gradients(est, row, a, acc)
        n = acc * a.batch
        cos = mean_pairwise_cosine(grads)
        rho = max(cos, 0.0) / (n * (1 - cos))
        rows.append({
            "prompt": prompt, "estimator": est, "rollouts_per_gradient": n, "cosine": cos, "rho": rho,
            "mean_reward": sum(rewards) / len(rewards), "seconds": time.perf_counter() - t0,
            **({"baseline_explained_per_step": explained} if explained else {}),
        })  # fmt: skip
        print(json.dumps(rows[-1]), flush=True)
        means[(prompt, est, acc)] = (grads.mean(0), n * a.reps * rho)
    cross = alignment(means)
    report = {"rows": rows, "alignment": cross}
    (out / "gradient_snr.json").write_text(json.dumps(report, indent=2))
    if a.json:
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json).write_text(json.dumps(report, indent=2))
    lines = [
        "| prompt | method | mean reward | rollouts / gradient | mean pairwise cos | ρ per rollout "
        "| s per gradient |",
        "|---|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {r['prompt'].removeprefix('a photo of ')} | {r['estimator']} | {r['mean_reward']:.2f} | "
        f"{r['rollouts_per_gradient']} | {r['cosine']:.3f} | {r['rho']:.1e} | {r['seconds'] / a.reps:.1f} |"
        for r in rows
    ]
    if cross:
        lines += ["", "| prompt | methods | cos of mean gradients | corrected for their noise |"]
        lines += ["|---|---|---|---|"]
        lines += [
            f"| {c['prompt'].removeprefix('a photo of ')} | {c['a']} · {c['b']} | {c['cosine']:.3f} | "
            + ("n/a" if c["corrected"] is None else f"{c['corrected']:.2f}")
            + " |"
            for c in cross
        ]
    table = "\n".join(lines)
    print(table)
    (out / "gradient_snr.md").write_text(table + "\n")


if __name__ == "__main__":
    main()
