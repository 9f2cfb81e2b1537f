"""Training memory and time of one micro-batch against the number of trained denoising steps T.

A randomly initialised DFM of about 25M parameters in the shipped ShapeWorld layout (16×16 canvas,
uniform-source metric path) trains on a micro-batch of B rollouts of K = 8 steps, with T of them
trained (``num_train_steps_per_rollout``). For each T and each mode — ``off`` (every step's graph
waits for TRL's single backward), ``step_backward`` (``step_checkpointing=True`` with token-level
ratios: each step backpropagated right after its forward) and ``recompute`` (``step_checkpointing=True``
where a loss couples the steps, forced here: each step's forward recomputed in backward) — it reports

* ``held_MB``: bytes of tensors saved for backward (outside checkpoints) still held when the loss
  is returned, deduplicated by storage: what grows with T when every step's graph waits;
* ``peak_MB``: the process's peak resident memory over the loss forward + backward, minus the
  resident memory after the rollout (each setting runs in a fresh subprocess);
* ``seconds`` and ``floor_ratio``: wall time of loss forward + backward, and its ratio to T bare
  model forward + backward passes on the same micro-batch (the floor).

    python benchmarks/memory_vs_steps.py [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


MODES = ("off", "step_backward", "recompute")


def measure(steps: int, mode: str, batch: int, hidden: int, layers: int, reps: int) -> dict:
    import gc
    import weakref

    from datasets import Dataset

    from dflow_trl.models import DFMTransformer, DFMTransformerConfig
    from dflow_trl.rollout import flow_logits
    from dflow_trl.tasks.shapeworld.pretrained import SHAPEWORLD_DIR, load_shapeworld_model
    from dflow_trl.trainer import DFlowGRPOConfig, DFlowGRPOTrainer

    torch.manual_seed(0)
    _, tok = load_shapeworld_model("t2i")
    cfg = DFMTransformerConfig.from_pretrained(SHAPEWORLD_DIR)
    cfg.hidden_size, cfg.num_hidden_layers = hidden, layers
    cfg.num_attention_heads, cfg.intermediate_size = max(1, hidden // 64), 3 * hidden
    model = DFMTransformer(cfg)
    args = DFlowGRPOConfig(
        output_dir="/tmp/memory_vs_steps", use_cpu=True, bf16=False, gradient_checkpointing=False,
        per_device_train_batch_size=batch, num_generations=batch, max_steps=1, num_flow_steps=8,
        estimator="top_k", top_k_size=4, num_mc_samples=4, train_steps="all",
        num_train_steps_per_rollout=steps, step_checkpointing=mode != "off", report_to="none", seed=0,
    )  # fmt: skip
    row = {"prompt": "a photo of a red square"}
    trainer = DFlowGRPOTrainer(
        model=model, reward_funcs=lambda prompts, **kw: [float(i) for i in range(len(prompts))], args=args,
        train_dataset=Dataset.from_list([row]), processing_class=tok,
    )  # fmt: skip
    if mode == "recompute":
        trainer._step_gradients = lambda *a: None
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = 1
    inputs = trainer._generate_and_score_completions([row] * batch)
    params = [p for p in trainer.model.parameters() if p.requires_grad]
    before = _rss_mb()

    def loss_step() -> None:
        trainer.model.zero_grad(set_to_none=True)
        trainer.compute_loss(trainer.model, inputs).backward()

    saved: list[tuple[weakref.ref, int]] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved.append((weakref.ref(t), t.untyped_storage().nbytes()))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = trainer.compute_loss(trainer.model, inputs)
    gc.collect()
    held = {t.untyped_storage().data_ptr(): n for ref, n in saved if (t := ref()) is not None}
    held_mb = sum(held.values()) / 2**20
    del loss, held
    loss_step()  # warm-up
    grads = torch.cat([p.grad.flatten() for p in params if p.grad is not None])
    t0 = time.perf_counter()
    for _ in range(reps):
        loss_step()
    seconds = (time.perf_counter() - t0) / reps
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - before

    flow_inputs = trainer._flow_model().prepare_flow_inputs([row["prompt"]] * batch, tok)
    canvas = inputs["flow_states"][:, 0]
    t0 = time.perf_counter()
    for _ in range(reps):
        for _ in range(steps):
            flow_logits(trainer.model, flow_inputs, canvas, t=0.5).float().logsumexp(-1).mean().backward()
    floor = (time.perf_counter() - t0) / reps
    n_params = sum(p.numel() for p in model.parameters())
    return {
        "T": steps, "mode": mode, "params_M": round(n_params / 1e6, 1), "batch": batch,
        "held_MB": round(held_mb, 1), "peak_MB": round(peak, 1), "seconds": round(seconds, 3),
        "floor_ratio": round(seconds / floor, 2), "grad_norm": grads.norm().item(),
    }  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, nargs="+", default=[1, 4, 8])
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--json", default=None)
    ap.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    ap.add_argument("--one", nargs=2, metavar=("T", "MODE"), help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.one:  # a single setting, in this fresh process, so that its peak memory is its own
        print(json.dumps(measure(int(a.one[0]), a.one[1], a.batch, a.hidden, a.layers, a.reps)))
        return
    rows = []
    for steps in a.steps:
        for mode in a.modes:
            cmd = [
                sys.executable, __file__, "--one", str(steps), mode, "--batch", str(a.batch),
                "--hidden", str(a.hidden), "--layers", str(a.layers), "--reps", str(a.reps),
            ]  # fmt: skip
            out = (
                subprocess.run(cmd, capture_output=True, text=True, check=True)
                .stdout.strip()
                .splitlines()[-1]
            )
            rows.append(json.loads(out))
            print(out, flush=True)
    first = {r["mode"]: r for r in rows if r["T"] == min(a.steps)}
    lines = [
        "| T | mode | held MB | peak MB | × T=min peak (same mode) | s per micro-batch | × floor |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        ratio = r["peak_MB"] / max(first[r["mode"]]["peak_MB"], 1e-9)
        cells = [r["T"], r["mode"], r["held_MB"], r["peak_MB"], f"{ratio:.2f}"]
        cells += [r["seconds"], r["floor_ratio"]]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    print("\n".join(lines))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
