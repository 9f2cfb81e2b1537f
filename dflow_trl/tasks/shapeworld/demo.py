"""``dflow-trl demo``: dFlowGRPO on the shipped ShapeWorld model, before and after, on a laptop CPU.

1. score the shipped base on held-out prompts (GenEval-style strict score per category, several
   samples per prompt, with its standard error; or VQA exact-match accuracy with
   ``--task understanding``);
2. run dFlowGRPO with LoRA on the training prompts for a fixed number of steps (a wall-clock
   budget stops it early only as a safety net);
3. score again with the same prompts and seeds, and write ``results.json``, ``samples.jsonl``
   (every scored sample, before and after, to rescore), ``reward_curve.png``,
   ``samples_before_after.png`` and the adapter with its model card to ``--output-dir``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import time
from pathlib import Path
from typing import Any

from transformers import TrainerCallback
from transformers.trainer_callback import ProgressCallback

from ...likelihood import ESTIMATORS

DEMO_DEFAULTS: dict[str, dict[str, Any]] = {
    # Tuned on a 2-core CPU to finish in ≤ 5 minutes, evaluations included (docs/shapeworld.md).
    "t2i": dict(
        num_generations=8,
        per_device_train_batch_size=32,
        # 2e-3 made single-prompt runs scatter or collapse (benchmarks/README.md).
        learning_rate=5e-4,
        # The paper's step counts: rollouts at K = 8, evaluation at K = 20.
        num_flow_steps=8,
        eval_steps=8,
        # Time grid t_k = (k/K)^3 for rollouts and evaluation: at K = 8 the first-stage base scored
        # 0.39 held-out with it and 0.31 on the uniform grid (docs/shapeworld.md).
        time_power=3.0,
        # 24 prompts per category × 4 samples (GenEval draws 4): standard error about 0.02.
        eval_per_tag=24,
        eval_samples=4,
        estimator="top_k",
        rollout_branching=False,
        # One x_0 per group: x_0 decides about a third of the reward's variance here, and removing it
        # from the advantage raised the 18-step gain from +0.026 to +0.044 on seeds 0, 1, 2
        # (benchmarks/README.md); unbiased and free.
        shared_source=True,
        step_baseline="none",
        # The strict (GenEval) reward: at 12 steps it raised the held-out score on seeds 0, 1, 2 by
        # +0.026, +0.009 and +0.061, while the partial-credit reward traded position for drawing
        # both objects (−0.007, +0.012, −0.036; docs/shapeworld.md).
        reward="shapeworld_strict",
        lora_r=16,
        # 30 steps gained +0.076, +0.083, +0.076 on seeds 0, 1, 2 where 18 gained +0.043, +0.005,
        # +0.085: the noise's damage comes in the first steps and the signal keeps coming
        # (benchmarks/README.md, placebo reward). About 4.5 s a step on an idle 2-core CPU, tied groups
        # not re-scored (skip_zero_advantage). The budget is a safety net only.
        train_minutes=6.0,
        max_steps=30,
    ),
    "understanding": dict(
        num_generations=8,
        per_device_train_batch_size=32,
        learning_rate=2e-3,
        # Rollouts at K = 2, evaluation at K = 4: a 2-token answer needs few steps, and 60 steps at K = 2
        # train in less time than 30 at K = 4 (168 s against 190 s side by side, one thread each) and
        # gained +0.095, +0.102, +0.058 on seeds 0, 1, 2 (mean +0.085) where 30 at K = 4 gained +0.014,
        # +0.079, +0.049. More is not better at this learning rate: 90 steps at K = 2 gained +0.000 and
        # 150 at K = 1 +0.060 on seed 0, position answers falling (benchmarks/README.md).
        num_flow_steps=2,
        eval_steps=4,
        eval_per_tag=0,
        # 240 held-out questions × 4 samples: standard error about 0.022, where one sample left 0.031.
        eval_samples=4,
        estimator="exact",
        reward="shapeworld_answer",
        lora_r=16,
        # A fixed step count, so the result does not depend on the machine's speed. The budget is a
        # safety net only.
        train_minutes=6.0,
        max_steps=60,
    ),
}


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="dflow-trl demo", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--output-dir", default="demo_output", help="where results, plots and the adapter go")
    ap.add_argument("--task", choices=["t2i", "understanding"], default="t2i")
    ap.add_argument("--train-minutes", type=float, default=None, help="time budget of the RL phase")
    ap.add_argument(
        "--max-steps", type=int, default=None, help="RL optimizer steps (stops earlier at the budget)"
    )
    ap.add_argument("--learning-rate", type=float, default=None)
    ap.add_argument("--estimator", choices=list(ESTIMATORS), default=None)
    ap.add_argument(
        "--rollout-branching", action=argparse.BooleanOptionalAction, default=None,
        help="step-level credit from branched rollouts (DFlowGRPOConfig.rollout_branching)",
    )
    ap.add_argument(
        "--shared-source", action=argparse.BooleanOptionalAction, default=None,
        help="each group's rollouts start from one x_0 (DFlowGRPOConfig.shared_source)",
    )
    ap.add_argument(
        "--step-baseline", default=None,
        help="per-step advantage baseline: none, greedy or rollouts (DFlowGRPOConfig.step_baseline, "
        "which checks the name)",
    )
    ap.add_argument(
        "--step-baseline-rollouts", type=int, default=None,
        help="continuations per step of --step-baseline rollouts (DFlowGRPOConfig.step_baseline_rollouts)",
    )
    ap.add_argument(
        "--step-baseline-lambda", type=float, default=None,
        help="TD(λ) on the step values, with a --step-baseline (DFlowGRPOConfig.step_baseline_lambda)",
    )
    ap.add_argument(
        "--reward", default=None,
        help="training reward (t2i: shapeworld_partial or shapeworld_strict; any registered reward name; "
        "placebo, a coin flip per sample, measures what the gradient's noise alone does)",
    )
    ap.add_argument(
        "--time-power", type=float, default=None,
        help="time grid t_k = (k/K)^power of rollouts and evaluation (t2i; DFlowGRPOConfig.flow_time_power)",
    )
    ap.add_argument("--lora-r", type=int, default=None, help="LoRA rank (alpha = 2 r)")
    ap.add_argument(
        "--train-steps-per-rollout", dest="num_train_steps_per_rollout", type=int, default=None,
        help="train a random subset of this many denoising steps per rollout "
        "(DFlowGRPOConfig.num_train_steps_per_rollout; default: all)",
    )
    ap.add_argument("--eval-per-tag", type=int, default=None, help="held-out prompts per category (t2i)")
    ap.add_argument("--eval-questions", type=int, default=240, help="held-out questions (understanding)")
    ap.add_argument(
        "--held-out", choices=["questions", "combinations"], default="questions",
        help="understanding split: disjoint questions of one distribution, or questions about "
        "combinations no training scene shows (docs/shapeworld.md)",
    )
    ap.add_argument(
        "--flow-steps", dest="num_flow_steps", type=int, default=None,
        help="denoising steps K of training rollouts (DFlowGRPOConfig.num_flow_steps)",
    )  # fmt: skip
    ap.add_argument("--eval-steps", type=int, default=None, help="Euler steps of evaluation rollouts")
    ap.add_argument("--eval-samples", type=int, default=None, help="samples per held-out prompt or question")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--model", default=None,
        help="model folder (default: the shipped ShapeWorld model for --task; for understanding, its "
        "noisy-answer understanding stage)",
    )
    return ap


def _balanced_train_prompts(seed: int, per_tag: int = 64) -> Any:
    """Training prompts with every category equally represented (the raw split is mostly colour_attr)."""
    from datasets import concatenate_datasets

    from .datasets import make_t2i_dataset
    from .prompts import TAGS

    full = make_t2i_dataset("train")
    rng = random.Random(seed)
    parts = []
    for tag in TAGS:
        idx = [i for i, t in enumerate(full["tag"]) if t == tag]
        parts.append(full.select([rng.choice(idx) for _ in range(per_tag)]))
    return concatenate_datasets(parts).shuffle(seed=seed)


class TimeBudgetCallback(TrainerCallback):
    """Stop training once the wall-clock budget is spent (checked after every optimizer step)."""

    def __init__(self, seconds: float) -> None:
        self.deadline = time.perf_counter() + seconds

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
        if time.perf_counter() > self.deadline:
            control.should_training_stop = True
        return control


class ProgressBar(TrainerCallback):
    """A progress bar with the mean training reward, in place of TRL's printing of every logged
    metric (those still reach the trackers in ``report_to``)."""

    def __init__(self, reward_key: str) -> None:
        self.reward_key, self.bar = reward_key, None

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        from tqdm.auto import tqdm

        self.bar = tqdm(total=state.max_steps, desc="[demo] dFlowGRPO", unit="step", dynamic_ncols=True)

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.bar is not None:
            self.bar.update(state.global_step - self.bar.n)

    def on_log(self, args: Any, state: Any, control: Any, logs: dict | None = None, **kwargs: Any) -> None:
        if self.bar is not None and logs and self.reward_key in logs:
            self.bar.set_postfix(reward=f"{logs[self.reward_key]:.3f}")

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def eval_seeds(seed: int, samples: int) -> tuple[int, ...]:
    """The evaluation's seeds: ``samples`` per prompt, the same for the base and the tuned model."""
    return tuple(1000 * seed + j for j in range(samples))


def _evaluate(task: str, model: Any, tok: Any, data: Any, cfg: dict[str, Any], seed: int) -> dict[str, Any]:
    from .evaluation import evaluate_t2i, evaluate_vqa

    seeds = eval_seeds(seed, cfg["eval_samples"])
    if task == "t2i":
        return evaluate_t2i(
            model, tok, data, num_steps=cfg["eval_steps"], seeds=seeds, batch_size=64, return_samples=True,
            time_power=cfg.get("time_power", 1.0),
        )
    return evaluate_vqa(model, tok, data, num_steps=cfg["eval_steps"], seeds=seeds, batch_size=64)


def picture_columns(tags: list[str], per_tag: int = 1) -> list[int]:
    """The held-out prompts the before/after picture shows: the first ``per_tag`` of each category
    in evaluation order, chosen before anything is scored, so they are representative rather
    than the ones RL happened to change."""
    columns: list[int] = []
    for tag in dict.fromkeys(tags):
        columns += [i for i, t in enumerate(tags) if t == tag][:per_tag]
    return columns


def _picture(eval_data: Any, base: dict[str, Any], final: dict[str, Any], out: Path) -> None:
    """The scored samples themselves (each prompt's first seed), base above and tuned below (same
    prompts, same noise), each framed green if it satisfies its prompt and red if not."""
    from .palette import render_grid_strip

    cols = picture_columns(eval_data["tag"], per_tag=2)
    rows = [[run["samples"][i][0] for i in cols] for run in (base, final)]
    marks = [[run["sample_strict"][i][0] == 1.0 for i in cols] for run in (base, final)]
    labels = [eval_data["prompt"][i].removeprefix("a photo of ") for i in cols]
    img = render_grid_strip(rows, labels=labels, row_labels=["base", "dFlowGRPO"], scale=10, marks=marks)
    img.save(out / "samples_before_after.png")


def _write_samples(
    eval_data: Any, base: dict[str, Any], final: dict[str, Any], seeds: tuple[int, ...], path: Path
) -> None:
    """``samples.jsonl``: one line per scored sample, with its prompt, GenEval metadata, seed and
    the base and tuned 16×16 grids of palette token ids, so anyone can rescore them."""
    from .palette import GRID

    with path.open("w") as f:
        for i, (prompt, meta) in enumerate(zip(eval_data["prompt"], eval_data["metadata"])):
            for j, seed in enumerate(seeds):
                row = {
                    "prompt": prompt,
                    "metadata": json.loads(meta),
                    "seed": seed,
                    "base_grid": [base["samples"][i][j][r * GRID : (r + 1) * GRID] for r in range(GRID)],
                    "final_grid": [final["samples"][i][j][r * GRID : (r + 1) * GRID] for r in range(GRID)],
                    "base_strict": base["sample_strict"][i][j],
                    "final_strict": final["sample_strict"][i][j],
                }
                f.write(json.dumps(row) + "\n")


def _reward_curve(history: list[dict[str, Any]], out: Path, key: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pts = [(h["step"], h[key]) for h in history if key in h]
    fig, ax = plt.subplots(figsize=(5, 3.2), dpi=120)
    if pts:
        ax.plot(*zip(*pts), marker="o", ms=3)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel(f"mean training reward ({key.split('/')[1] if '/' in key else key})")
    ax.set_title("dFlowGRPO on ShapeWorld")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "reward_curve.png")
    plt.close(fig)


def build_trainer(
    model: Any,
    tok: Any,
    train_data: Any,
    cfg: dict[str, Any],
    output_dir: str | Path,
    seed: int,
    callbacks: list | None = None,
) -> Any:
    """The demo's ``DFlowGRPOTrainer``: LoRA of rank ``cfg["lora_r"]`` on every projection, one
    optimizer step per generation batch, constant learning rate, logging every step.

    ``cfg`` holds ``num_generations``, ``per_device_train_batch_size``, ``learning_rate``,
    ``max_steps``, ``num_flow_steps``, ``estimator``, ``reward`` and ``lora_r`` (as in
    ``DEMO_DEFAULTS``)."""
    import torch
    from peft import LoraConfig

    from ...rewards import get_reward_function
    from ...trainer import DFlowGRPOConfig, DFlowGRPOTrainer

    targs = DFlowGRPOConfig(
        output_dir=str(output_dir),
        use_cpu=not torch.cuda.is_available(),
        bf16=False,
        gradient_checkpointing=False,
        per_device_train_batch_size=cfg["per_device_train_batch_size"],
        num_generations=cfg["num_generations"],
        learning_rate=cfg["learning_rate"],
        lr_scheduler_type="constant",
        max_steps=cfg["max_steps"],
        num_flow_steps=cfg["num_flow_steps"],
        estimator=cfg["estimator"],
        rollout_branching=cfg.get("rollout_branching", False),
        shared_source=cfg.get("shared_source", False),
        step_baseline=cfg.get("step_baseline", "none"),
        step_baseline_lambda=cfg.get("step_baseline_lambda", 1.0),
        step_baseline_rollouts=cfg.get("step_baseline_rollouts", 2),
        num_train_steps_per_rollout=cfg.get("num_train_steps_per_rollout"),
        flow_time_power=cfg.get("time_power", 1.0),
        num_mc_samples=8,
        top_k_size=4,
        include_last_step=True,
        epsilon=0.2,
        # Per-group scaling (TRL's default) gained +0.017 and +0.023 where this gains +0.076 and +0.083
        # on text-to-image (seeds 0, 1; benchmarks/README.md); understanding was not measured.
        scale_rewards="batch",
        loss_type="grpo",
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        seed=seed,
        disable_tqdm=False,
    )
    return DFlowGRPOTrainer(
        model=model,
        reward_funcs=get_reward_function(cfg["reward"]),
        args=targs,
        train_dataset=train_data,
        processing_class=tok,
        peft_config=LoraConfig(
            r=cfg["lora_r"], lora_alpha=2 * cfg["lora_r"], lora_dropout=0.0,
            target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        ),
        callbacks=callbacks,
    )


def _with_se(value: float, se: float) -> str:
    """``0.540 ± 0.019``, or ``0.540 ± n/a`` when the spread cannot be estimated (one prompt per category)."""
    return f"{value:.3f} ± {'n/a' if math.isnan(se) else f'{se:.3f}'}"


def _nan_to_null(obj: Any) -> Any:
    """``obj`` with every NaN (a standard error that cannot be estimated) as ``None``: strict JSON
    has no NaN, and ``null`` reads as "unknown" in every parser."""
    if isinstance(obj, float) and math.isnan(obj):
        return None
    if isinstance(obj, dict):
        return {k: _nan_to_null(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_nan_to_null(v) for v in obj]
    return obj


def _summary(task: str, base: dict[str, Any], final: dict[str, Any]) -> str:
    """A few lines for the console: the headline with standard errors, and each category."""
    key, groups = ("strict", "per_category") if task == "t2i" else ("accuracy", "per_qtype")
    lines = [
        f"[demo] held-out {key}: {_with_se(base[key], base[key + '_se'])} "
        f"→ {_with_se(final[key], final[key + '_se'])}"
    ]
    lines += [f"[demo]   {g:<14} {base[groups][g]:.2f} → {final[groups][g]:.2f}" for g in base[groups]]
    return "\n".join(lines)


def run(args: argparse.Namespace, base: dict[str, Any] | None = None) -> dict[str, Any]:
    """The demo; ``base`` (a previous base evaluation on the same prompts and seeds) skips re-scoring it."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    t_start = time.perf_counter()
    import torch

    from .datasets import make_vqa_dataset
    from .evaluation import balanced_t2i_eval_set, standard_error, stratified_standard_error
    from .pretrained import load_shapeworld_model

    task = args.task
    cfg = dict(DEMO_DEFAULTS[task])
    overridable = (
        "train_minutes", "max_steps", "learning_rate", "estimator", "rollout_branching", "step_baseline",
        "step_baseline_lambda", "time_power", "reward", "eval_per_tag", "eval_steps", "eval_samples",
        "lora_r", "num_train_steps_per_rollout", "shared_source", "step_baseline_rollouts", "num_flow_steps",
    )  # fmt: skip
    for key in overridable:
        if getattr(args, key, None) is not None:
            cfg[key] = getattr(args, key)
    if cfg["eval_samples"] < 1:
        raise ValueError(f"--eval-samples must be >= 1, got {cfg['eval_samples']}")
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(args.seed)
    model, tok = load_shapeworld_model(task=task, path=args.model)

    if task == "t2i":
        eval_data = balanced_t2i_eval_set("test", per_tag=cfg["eval_per_tag"], seed=args.seed)
        train_data = _balanced_train_prompts(args.seed)
        extra_config = {}
    else:
        held_out = getattr(args, "held_out", "questions")
        extra_config = {"held_out": held_out}
        eval_data = make_vqa_dataset("test", n=args.eval_questions, seed=args.seed, held_out=held_out)
        train_data = make_vqa_dataset("train", n=2000, seed=args.seed, held_out=held_out)
    what = "prompts" if task == "t2i" else "questions"
    if base is None:
        print(
            f"[demo] scoring the base on {len(eval_data)} held-out {what} × {cfg['eval_samples']} samples …"
        )
        base = _evaluate(task, model, tok, eval_data, cfg, args.seed)
    headline = "strict" if task == "t2i" else "accuracy"
    print(f"[demo] base held-out {headline}: {_with_se(base[headline], base[headline + '_se'])}")

    reward_key = f"rewards/{cfg['reward']}/mean"
    trainer = build_trainer(
        model, tok, train_data, cfg, out, args.seed,
        callbacks=[TimeBudgetCallback(cfg["train_minutes"] * 60), ProgressBar(reward_key)],
    )  # fmt: skip
    trainer.remove_callback(ProgressCallback)
    t_train = time.perf_counter()
    trainer.train()
    train_seconds = time.perf_counter() - t_train
    if trainer.state.global_step < cfg["max_steps"]:
        print(
            f"[demo] the {cfg['train_minutes']:.1f}-minute safety budget stopped training at step "
            f"{trainer.state.global_step}"
        )
    policy = trainer.model
    policy.eval()
    print("[demo] scoring the tuned model …")
    final = _evaluate(task, policy, tok, eval_data, cfg, args.seed)
    print(_summary(task, base, final))

    trainer.save_model(str(out / "adapter"))
    from ...trainer.model_card import flow_model_card

    card = flow_model_card(trainer, dataset_name=f"shapeworld-{task}", weights_path=str(out / "adapter"))
    card.save(str(out / "adapter" / "README.md"))
    _reward_curve(trainer.state.log_history, out, reward_key)
    if task == "t2i":
        if "samples" in base:
            _picture(eval_data, base, final, out)
            seeds = eval_seeds(args.seed, cfg["eval_samples"])
            _write_samples(eval_data, base, final, seeds, out / "samples.jsonl")
        else:
            print("[demo] no picture or samples.jsonl: the base evaluation passed in holds no samples")
        # The grids are in samples.jsonl; results.json keeps the scores.
        base, final = (
            {k: v for k, v in r.items() if k not in ("samples", "sample_strict")} for r in (base, final)
        )
    per_item = "per_prompt" if task == "t2i" else "per_question"
    diffs = [f - b for b, f in zip(base[per_item], final[per_item])]
    results = {
        "task": task,
        "metric": f"held-out {headline}",
        "base_score": base[headline],
        "final_score": final[headline],
        "base_se": base[headline + "_se"],
        "final_se": final[headline + "_se"],
        "improvement": final[headline] - base[headline],
        # Paired over the same prompts and noise: the standard error that the improvement itself has.
        "improvement_se": (
            stratified_standard_error(diffs, eval_data["tag"]) if task == "t2i" else standard_error(diffs)
        ),
        "samples_per_prompt": cfg["eval_samples"],
        "base": base,
        "final": final,
        "steps": trainer.state.global_step,
        "train_seconds": round(train_seconds, 1),
        "wall_seconds": round(time.perf_counter() - t_start, 1),
        "reward_curve": [h[reward_key] for h in trainer.state.log_history if reward_key in h],
        "config": {**cfg, "seed": args.seed, **extra_config},
    }
    (out / "results.json").write_text(json.dumps(_nan_to_null(results), indent=2, allow_nan=False))
    written = ", samples.jsonl, samples_before_after.png" if task == "t2i" else ""
    print(
        f"[demo] wrote {out}/results.json{written}, reward_curve.png, adapter/ "
        f"in {results['wall_seconds']:.0f} s"
    )
    return results


def main(argv: list[str] | None = None) -> int:
    run(build_parser().parse_args(argv))
    return 0
