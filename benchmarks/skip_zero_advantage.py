"""Loss time with and without ``skip_zero_advantage`` on the ShapeWorld demo's own batches.

The demo's trainer (``dflow_trl.tasks.shapeworld.demo.build_trainer``: LoRA, ``top_k``, K = 8 on
the power-3 grid, strict reward, 4 prompts × 8 rollouts) rolls out its first ``--batches``
generation batches of training prompts. Each batch's loss forward + backward runs twice, once
with the option and once without, in alternating order, in one process on one thread, so the
ratio is taken side by side. It reports per batch the share of rollouts skipped, the two loss
times, the rollout time, and the largest difference between the two gradients.

    python benchmarks/skip_zero_advantage.py [--batches 6] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batches", type=int, default=6)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--output", default="benchmarks/results/skip_zero_advantage")
    ap.add_argument("--json", default=None, help="also write the table as JSON to this path")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from dflow_trl.tasks.shapeworld import demo
    from dflow_trl.tasks.shapeworld.pretrained import load_shapeworld_model

    cfg = {**demo.DEMO_DEFAULTS["t2i"], "max_steps": 1}
    torch.manual_seed(args.seed)
    model, tok = load_shapeworld_model(task="t2i")
    prompts = demo._balanced_train_prompts(args.seed)
    trainer = demo.build_trainer(model, tok, prompts, cfg, args.output, args.seed)
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = 1  # set by the training loop, which is not run here
    g, per_batch = cfg["num_generations"], cfg["per_device_train_batch_size"] // cfg["num_generations"]
    rows_out = []
    for i in range(args.batches):
        rows = [dict(prompts[per_batch * i + j]) for j in range(per_batch) for _ in range(g)]
        trainer.args.skip_zero_advantage = True  # the rollout then records the entropies skipping needs
        t0 = time.perf_counter()
        batch = trainer._generate_and_score_completions(rows)
        rollout_s = time.perf_counter() - t0
        seconds, grads = {}, {}
        for skip in (True, False) if i % 2 else (False, True):
            trainer.args.skip_zero_advantage = skip
            trainer.model.zero_grad(set_to_none=True)
            t0 = time.perf_counter()
            trainer.compute_loss(trainer.model, batch).backward()
            seconds[skip] = time.perf_counter() - t0
            grads[skip] = torch.cat(
                [p.grad.flatten() for p in trainer.model.parameters() if p.grad is not None]
            )
        row = {
            "batch": i,
            "skipped_frac": trainer._metrics["train"]["flow/skipped_frac"][-1],
            "rollout_s": round(rollout_s, 3),
            "loss_s_all": round(seconds[False], 3),
            "loss_s_skip": round(seconds[True], 3),
            "max_grad_diff": (grads[True] - grads[False]).abs().max().item(),
            "grad_max": grads[False].abs().max().item(),
        }
        rows_out.append(row)
        print(json.dumps(row), flush=True)
    total = {k: sum(r[k] for r in rows_out) for k in ("rollout_s", "loss_s_all", "loss_s_skip")}
    summary = {
        "loss_ratio": total["loss_s_skip"] / total["loss_s_all"],
        "step_ratio": (total["rollout_s"] + total["loss_s_skip"])
        / (total["rollout_s"] + total["loss_s_all"]),
        "mean_skipped_frac": sum(r["skipped_frac"] for r in rows_out) / len(rows_out),
    }
    print("| batch | skipped | rollout s | loss s (all) | loss s (skip) | max grad diff |")
    print("|---|---|---|---|---|---|")
    for r in rows_out:
        print(
            f"| {r['batch']} | {r['skipped_frac']:.2f} | {r['rollout_s']:.1f} | {r['loss_s_all']:.1f} | "
            f"{r['loss_s_skip']:.1f} | {r['max_grad_diff']:.1e} |"
        )
    print(
        f"loss time ×{summary['loss_ratio']:.2f}, step time ×{summary['step_ratio']:.2f}, "
        f"{summary['mean_skipped_frac']:.2f} of rollouts skipped on average"
    )
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"rows": rows_out, **summary}, f, indent=2)


if __name__ == "__main__":
    main()
