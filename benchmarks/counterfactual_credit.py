"""Signal per rollout of counterfactual per-block credit (``dflow_trl.credit``) on the shipped ShapeWorld
model.

For one prompt, draw R batches of N rollouts (groups of G sharing their source draw, the demo's
K = 8 on t_k = (k/K)³, the strict reward), every step's noise from a generator seeded per step.
On the *same* rollouts each method's batch gradient of E[R] is taken on the full model:

- ``plain``: every position of every step gets ``R − mean_G R`` (the trainer's unbiased
  advantage with ``shared_source``, no std scaling);
- ``posterior_only``: diffu-GRPO's biased ``(R − mean_G R) ∇ log p^θ_{1|0}(x_K | x_0)``;
- ``cfB``: ``A_{k,i} = R − F(x_{k+1}[β(i) ← x_k^{β(i)}], ξ_{k+1:})`` with B square blocks
  (``B = 1``: the whole canvas, a coupled value of ``x_k``), unbiased.

It reports each method's mean pairwise cosine of the R gradients and ρ = cos / (N (1 − cos)), the
signal-to-noise ratio of one rollout (``benchmarks/gradient_snr.py`` explains it), and the seconds
the method's advantages took per gradient.

    python benchmarks/counterfactual_credit.py --prompts "a photo of a square left of a circle" \\
        --blocks 1 4 16 --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")


def mean_pairwise_cosine(grads: torch.Tensor) -> float:
    unit = grads / grads.norm(dim=1, keepdim=True).clamp_min(1e-30)
    c = unit @ unit.T
    n = len(grads)
    return float((c.sum() - c.diagonal().sum()) / (n * (n - 1)))


def run_prompt(prompt: str, args: argparse.Namespace) -> list[dict]:
    from dflow_trl.credit import counterfactual_advantages, seeded_rollout, square_blocks
    from dflow_trl.likelihood import get_estimator
    from dflow_trl.rollout import flow_log_posterior
    from dflow_trl.sampling import time_grid
    from dflow_trl.tasks.shapeworld import all_prompts
    from dflow_trl.tasks.shapeworld.pretrained import load_shapeworld_model
    from dflow_trl.tasks.shapeworld.scoring import score_t2i

    torch.manual_seed(args.seed)
    model, tok = load_shapeworld_model("t2i", args.model)
    path = model.get_probability_path()
    est = get_estimator("exact")
    meta = {m["prompt"]: m for m in all_prompts()}[prompt]
    n, g, k_steps = args.batch, args.num_generations, args.num_flow_steps
    batch = model.prepare_flow_inputs([prompt] * n, tok)
    times = time_grid(k_steps, power=args.time_power).double()
    d = batch.canvas_length
    params = [p for p in model.parameters() if p.requires_grad]

    def reward(canvas: torch.LongTensor) -> torch.Tensor:
        return torch.tensor([score_t2i(c, meta)[0] for c in canvas.tolist()], dtype=torch.float64)

    def gradient(traj, adv: torch.Tensor | None, final_adv: torch.Tensor | None = None) -> torch.Tensor:
        model.zero_grad(set_to_none=True)
        if final_adv is not None:  # posterior_only
            lp = flow_log_posterior(model, batch, traj.states[:, 0], 0.0)
            score = lp.gather(-1, traj.final.unsqueeze(-1)).squeeze(-1).sum(-1)
            (-(final_adv.float() * score).sum() / n).backward()
        else:
            for k in range(k_steps):
                rec = traj.step(k)
                t, h = float(times[k]), float(times[k + 1] - times[k])
                per_pos = est.step_log_prob(path, rec, flow_log_posterior(model, batch, rec.x_t, t), t, h)
                (-(adv[:, k].float() * per_pos.float()).sum() / n).backward()
        return torch.cat([p.grad.flatten() for p in params if p.grad is not None]).clone()

    methods = ["plain", "posterior_only"] + [f"cf{b}" for b in args.blocks]
    grads: dict[str, list[torch.Tensor]] = {m: [] for m in methods}
    seconds = dict.fromkeys(methods, 0.0)
    rewards = []
    for rep in range(args.reps):
        seeds = [10_000 * (args.seed + 1) + 100 * rep + k for k in range(k_steps)]
        source = torch.Generator().manual_seed(seeds[0] + 77)
        x0 = path.sample_source((n // g, d), generator=source).repeat_interleave(g, 0)
        start = time.perf_counter()
        traj = seeded_rollout(model, batch, path, times, seeds, x0, estimator=est)
        r = reward(traj.final)
        rollout_s = time.perf_counter() - start
        rewards.append(float(r.mean()))
        adv = r - r.view(-1, g).mean(-1).repeat_interleave(g)
        for m in methods:
            start = time.perf_counter()
            if m == "plain":
                grads[m].append(gradient(traj, adv.view(n, 1, 1).expand(n, k_steps, d)))
            elif m == "posterior_only":
                grads[m].append(gradient(traj, None, adv))
            else:
                per_side = round(int(m[2:]) ** 0.5)
                _, a = counterfactual_advantages(
                    model, batch, path, traj, seeds, reward, square_blocks(d, per_side)
                )
                grads[m].append(gradient(traj, a))
            seconds[m] += time.perf_counter() - start + rollout_s
        print(f"[{prompt}] batch {rep + 1}/{args.reps}: mean reward {rewards[-1]:.2f}", flush=True)
    rows = []
    for m in methods:
        cos = mean_pairwise_cosine(torch.stack(grads[m]))
        rho = max(cos, 0.0) / (n * (1 - cos))
        rows.append(
            {"prompt": prompt, "method": m, "mean_reward": sum(rewards) / len(rewards), "cos": cos,
             "rho": rho, "seconds_per_gradient": seconds[m] / args.reps, "rollouts_per_gradient": n}
        )  # fmt: skip
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--prompts", nargs="+",
        default=["a photo of a square left of a circle", "a photo of a blue square and a red cross"],
    )  # fmt: skip
    ap.add_argument(
        "--blocks", type=int, nargs="+", default=[1, 4, 16], help="square block counts (1, 4, 16, 64 …)"
    )
    ap.add_argument("--reps", type=int, default=8, help="gradients per method (R)")
    ap.add_argument("--batch", type=int, default=32, help="rollouts per gradient (N)")
    ap.add_argument("--num-generations", type=int, default=8, help="rollouts per group (G)")
    ap.add_argument("--num-flow-steps", type=int, default=8)
    ap.add_argument("--time-power", type=float, default=3.0)
    ap.add_argument("--model", default=None, help="a ShapeWorld checkpoint (the shipped one by default)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None, help="also write the table here")
    args = ap.parse_args()
    if args.batch % args.num_generations:
        ap.error("--batch must be a multiple of --num-generations")
    rows = [row for prompt in args.prompts for row in run_prompt(prompt, args)]
    print("| prompt | method | mean reward | mean pairwise cos | ρ per rollout | s per gradient |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['prompt'].removeprefix('a photo of ')} | {r['method']} | {r['mean_reward']:.2f} | "
            f"{r['cos']:.3f} | {r['rho']:.1e} | {r['seconds_per_gradient']:.0f} |"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
