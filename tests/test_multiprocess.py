"""Two CPU processes (gloo) through the CLI: the image-logging collective is joined by every rank."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

from .tiny import tiny_model, tiny_tokenizer

ROOT = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_train_and_log_sample_images(tmp_path):
    """``log_sample_images`` (default 4) gathers images at every logging step; before the fix only rank 0
    joined that collective and the run died at its first log."""
    model_dir = tmp_path / "model"
    tiny_model("uniform").save_pretrained(model_dir)
    tiny_tokenizer().save_pretrained(model_dir)
    data = tmp_path / "prompts.jsonl"
    data.write_text("\n".join(json.dumps({"prompt": p}) for p in ["a red square", "a blue circle"] * 8))
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        f"""
model_name_or_path: {model_dir}
dataset_name: {data}
reward_funcs: [tests.tiny.count_reward]
output_dir: {tmp_path / "out"}
use_cpu: true
bf16: false
gradient_checkpointing: false
per_device_train_batch_size: 4
num_generations: 4
num_flow_steps: 3
estimator: top_k
num_mc_samples: 4
top_k_size: 2
max_steps: 2
logging_steps: 1
save_strategy: "no"
report_to: none
use_peft: true
lora_r: 4
lora_alpha: 8
lora_target_modules: [q_proj, v_proj]
"""
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_free_port()),
        "-m", "dflow_trl.cli", "train", "--config", str(recipe),
    ]  # fmt: skip
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "out" / "adapter_model.safetensors").is_file()
    assert proc.stdout.count("'loss'") + proc.stderr.count("'loss'") >= 2  # both logging steps ran
