"""A short dFlowGRPO run on the shipped ShapeWorld model raises its reward on the prompt it trains on."""

from __future__ import annotations

import json
import os

import torch
from datasets import Dataset

from dflow_trl.tasks.shapeworld import all_prompts
from dflow_trl.tasks.shapeworld.demo import DEMO_DEFAULTS, build_trainer
from dflow_trl.tasks.shapeworld.evaluation import evaluate_t2i
from dflow_trl.tasks.shapeworld.pretrained import load_shapeworld_model

os.environ.setdefault("HF_HUB_OFFLINE", "1")

# With 8 Euler steps on the uniform grid the shipped base half-solves this training prompt
# (expected partial reward 0.56 over 32 seeded samples, strict 0.19: one of the two shapes is often
# missing or a fragment). Two objects is the category the demo's RL raises on every seed.
PROMPT = "a photo of a square and a triangle"
LEARNING_RATE = 5e-4
MIN_GAIN = 0.05


def test_short_lora_run_raises_the_training_reward(tmp_path):
    meta = next(m for m in all_prompts(["two_object"]) if m["prompt"] == PROMPT)
    row = {"prompt": PROMPT, "tag": meta["tag"], "metadata": json.dumps(meta)}
    probe = Dataset.from_list([row] * 64)
    torch.manual_seed(0)
    model, tok = load_shapeworld_model("t2i")
    cfg = {
        **DEMO_DEFAULTS["t2i"], "per_device_train_batch_size": 16, "max_steps": 12, "estimator": "top_k",
        "learning_rate": LEARNING_RATE,
    }  # fmt: skip
    # The uniform grid, for rollouts and scoring alike. On the demo's power-3 grid the same run went
    # 0.531 -> 0.572 (seed 0): a gain too close to the noise to test against.
    cfg["time_power"] = grid = 1.0
    cfg["reward"] = "shapeworld_partial"  # the dense reward this run was measured with
    before = evaluate_t2i(model, tok, probe, num_steps=8, seeds=(123,), time_power=grid)["partial"]
    trainer = build_trainer(model, tok, Dataset.from_list([row] * 16), cfg, tmp_path / "out", seed=0)
    trainer.train()
    after = evaluate_t2i(trainer.model, tok, probe, num_steps=8, seeds=(123,), time_power=grid)["partial"]
    assert after > before + MIN_GAIN, (before, after)
    rewards = [
        h["rewards/shapeworld_partial/mean"]
        for h in trainer.state.log_history
        if "rewards/shapeworld_partial/mean" in h
    ]
    assert sum(rewards[-3:]) / 3 > sum(rewards[:3]) / 3, rewards
