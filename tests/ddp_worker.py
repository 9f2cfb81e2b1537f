"""Run by ``tests/test_multiprocess.py`` under ``torch.distributed.run``: train a tiny DFM through the
Python API (full model or LoRA, TRL's default gradient checkpointing) and write a digest of every
rank's parameters, so the test can check that the ranks end identical."""

from __future__ import annotations

import hashlib
import os
import sys
from pathlib import Path

import torch
from peft import LoraConfig

from dflow_trl import DFlowGRPOConfig, DFlowGRPOTrainer
from tests.tiny import count_reward, prompt_dataset, tiny_model, tiny_tokenizer


def main(out: str, mode: str) -> None:
    # "lora_step_backward": each trained step backpropagated at once (step_checkpointing), with gradient
    # accumulation, so its gradients must still reach DDP's all-reduce inside TRL's single backward.
    step_backward = mode == "lora_step_backward"
    args = DFlowGRPOConfig(
        output_dir=out, use_cpu=True, bf16=False, per_device_train_batch_size=4, num_generations=4,
        num_flow_steps=3, estimator="top_k", num_mc_samples=4, top_k_size=2, max_steps=2,
        learning_rate=1e-2, logging_steps=1, save_strategy="no", report_to="none", seed=0,
        step_checkpointing=step_backward, gradient_accumulation_steps=2 if step_backward else 1,
    )  # fmt: skip
    assert args.gradient_checkpointing, "TRL's default: gradient checkpointing on"
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    peft = lora if mode.startswith("lora") else None
    trainer = DFlowGRPOTrainer(
        model=tiny_model("uniform"), reward_funcs=count_reward, args=args,
        train_dataset=prompt_dataset(16), processing_class=tiny_tokenizer(), peft_config=peft,
    )  # fmt: skip
    used = []
    if step_backward:
        original = trainer._step_gradients
        trainer._step_gradients = lambda *a: used.append(original(*a)) or used[-1]
    trainer.train()
    assert not step_backward or (used and all(store is not None for store in used)), "steps recomputed"
    digest = hashlib.sha256()
    for name, p in sorted(trainer.model.named_parameters()):
        digest.update(name.encode() + p.detach().cpu().numpy().tobytes())
    rank = int(os.environ.get("RANK", "0"))
    Path(out, f"params_rank{rank}.sha256").write_text(digest.hexdigest())


if __name__ == "__main__":
    torch.set_num_threads(1)
    main(sys.argv[1], sys.argv[2])
