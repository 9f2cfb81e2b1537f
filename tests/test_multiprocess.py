"""Two CPU processes (gloo) through the CLI: the image-logging collective is joined by every rank."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

from .tiny import tiny_recipe

ROOT = Path(__file__).resolve().parents[1]


def _torchrun(*args: str) -> list[str]:
    """Two local processes; ``--standalone`` lets the rendezvous pick a free port itself, where a port
    chosen here and released could be taken before the launcher binds it."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *args]


def _failure(proc: subprocess.CompletedProcess) -> str:
    """The exit code, the tracebacks and error lines of every rank, and the output's tail: DDP's
    per-rank warnings alone can fill the last few thousand characters of stderr."""
    marker = re.compile(r"Error|Traceback|error:|exitcode|Signal")
    errors = [ln for ln in proc.stderr.splitlines() if marker.search(ln)]
    return (
        f"exit code {proc.returncode}\n--- error lines ---\n"
        + "\n".join(errors[-60:])
        + f"\n--- stdout tail ---\n{proc.stdout[-1500:]}\n--- stderr tail ---\n{proc.stderr[-3000:]}"
    )


def _check_exit(proc: subprocess.CompletedProcess) -> None:
    """The launch succeeded, or failed only in a known teardown fault: training finished, then one rank
    aborted at interpreter exit ("terminate called without an active exception", SIGABRT; about one
    launch in 20–40 here, cause not yet found). That one warns, and the test goes on to check what the
    run wrote; anything else fails with every rank's errors."""
    teardown = (
        proc.returncode != 0
        and "terminate called without an active exception" in proc.stderr
        and "SIGABRT" in proc.stderr
        and "train_runtime" in proc.stdout + proc.stderr
    )
    if teardown:
        warnings.warn("a rank aborted at exit after training finished (known teardown fault)", stacklevel=2)
        return
    assert proc.returncode == 0, _failure(proc)


def test_two_processes_train_and_log_sample_images(tmp_path):
    """``log_sample_images`` (default 4) gathers images at every logging step; before the fix only rank 0
    joined that collective and the run died at its first log."""
    recipe = tiny_recipe(tmp_path)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    cmd = _torchrun("-m", "dflow_trl.cli", "train", "--config", str(recipe))
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    _check_exit(proc)
    assert (tmp_path / "out" / "adapter_model.safetensors").is_file()
    assert proc.stdout.count("'loss'") + proc.stderr.count("'loss'") >= 2  # both logging steps ran


@pytest.mark.parametrize("mode", ["full", "lora", "lora_step_backward"])
def test_two_processes_end_with_identical_parameters(tmp_path, mode):
    """Full-model and LoRA DDP runs with TRL's default gradient checkpointing train (a t2i DFM never uses
    its text head, which DDP used to refuse as an unused parameter) and end with the same parameters
    on both ranks, also when each trained step is backpropagated at once (``step_checkpointing``)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    cmd = _torchrun("-m", "tests.ddp_worker", str(tmp_path), mode)
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    _check_exit(proc)
    digests = [(tmp_path / f"params_rank{r}.sha256").read_text() for r in (0, 1)]
    assert digests[0] == digests[1]
