"""Two CPU processes (gloo) through the CLI: the image-logging collective is joined by every rank."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from .tiny import tiny_recipe

ROOT = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_train_and_log_sample_images(tmp_path):
    """``log_sample_images`` (default 4) gathers images at every logging step; before the fix only rank 0
    joined that collective and the run died at its first log."""
    recipe = tiny_recipe(tmp_path)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
        "--master_port", str(_free_port()), "-m", "dflow_trl.cli", "train", "--config", str(recipe),
    ]  # fmt: skip
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "out" / "adapter_model.safetensors").is_file()
    assert proc.stdout.count("'loss'") + proc.stderr.count("'loss'") >= 2  # both logging steps ran


@pytest.mark.parametrize("mode", ["full", "lora"])
def test_two_processes_end_with_identical_parameters(tmp_path, mode):
    """Full-model and LoRA DDP runs with TRL's default gradient checkpointing train (a t2i DFM never uses
    its text head, which DDP used to refuse as an unused parameter) and end with the same parameters
    on both ranks."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
        "--master_port", str(_free_port()), "-m", "tests.ddp_worker", str(tmp_path), mode,
    ]  # fmt: skip
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    digests = [(tmp_path / f"params_rank{r}.sha256").read_text() for r in (0, 1)]
    assert digests[0] == digests[1]
