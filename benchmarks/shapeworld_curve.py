"""Held-out strict score against RL steps: the demo's run, scored at several optimizer steps.

Trains exactly as ``dflow-trl demo`` does (``DEMO_DEFAULTS["t2i"]``, LoRA, the balanced training
prompts, the same seed) for ``--steps`` optimizer steps with no time budget, and runs the demo's
held-out evaluation (24 prompts per category × 4 samples, same prompts and noise) before training
and after each step in ``--evals``. ``--set KEY=VALUE`` overrides a demo setting (a Python
literal), e.g. ``--set estimator='"posterior_only"'`` or ``--set step_baseline='"greedy"'``.

    python benchmarks/shapeworld_curve.py --steps 48 --evals 12 24 48 --json curve.json
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import time

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=48)
    ap.add_argument("--evals", type=int, nargs="+", default=[12, 24, 48], help="steps to score after")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="demo settings to override")
    ap.add_argument("--output", default="benchmarks/results/shapeworld_curve")
    ap.add_argument("--json", default=None, help="write the rows as JSON to this path (after every eval)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from transformers import TrainerCallback
    from transformers.trainer_callback import ProgressCallback

    from dflow_trl.tasks.shapeworld import demo
    from dflow_trl.tasks.shapeworld.evaluation import balanced_t2i_eval_set
    from dflow_trl.tasks.shapeworld.pretrained import load_shapeworld_model

    cfg = {**demo.DEMO_DEFAULTS["t2i"], "max_steps": args.steps, "train_minutes": float("inf")}
    for item in args.set:
        key, _, value = item.partition("=")
        if key not in cfg and key not in ("step_baseline_lambda",):
            raise SystemExit(f"unknown demo setting {key!r}; the settings are {sorted(cfg)}")
        cfg[key] = ast.literal_eval(value)
    torch.manual_seed(args.seed)
    model, tok = load_shapeworld_model(task="t2i")
    eval_data = balanced_t2i_eval_set("test", per_tag=cfg["eval_per_tag"], seed=args.seed)
    rows: list[dict] = []
    start = time.perf_counter()

    def score(policy, step: int) -> None:
        was_training = policy.training
        policy.eval()
        t0 = time.perf_counter()
        result = demo._evaluate("t2i", policy, tok, eval_data, cfg, args.seed)
        policy.train(was_training)
        row = {
            "step": step, "strict": result["strict"], "se": result["strict_se"],
            "per_category": result["per_category"], "eval_seconds": round(time.perf_counter() - t0, 1),
            "seconds": round(time.perf_counter() - start, 1),
        }  # fmt: skip
        rows.append(row)
        print(json.dumps(row), flush=True)
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"config": cfg, "seed": args.seed, "rows": rows}, f, indent=1, default=str)

    class ScoreAt(TrainerCallback):
        def on_step_end(self, targs, state, control, **kwargs):
            if state.global_step in args.evals:
                score(trainer.model, state.global_step)

    score(model, 0)
    prompts = demo._balanced_train_prompts(args.seed)
    trainer = demo.build_trainer(model, tok, prompts, cfg, args.output, args.seed, callbacks=[ScoreAt()])
    trainer.remove_callback(ProgressCallback)
    trainer.train()
    print("| step | held-out strict | " + " | ".join(rows[0]["per_category"]) + " |")
    print("|---" * (len(rows[0]["per_category"]) + 2) + "|")
    for r in rows:
        cats = " | ".join(f"{v:.2f}" for v in r["per_category"].values())
        print(f"| {r['step']} | {r['strict']:.3f} ± {r['se']:.3f} | {cats} |")


if __name__ == "__main__":
    main()
