"""dFlowGRPO on FUDOKI (tiny random checkpoint in FUDOKI's layout): text-to-image and understanding
with LoRA on the language model; adapters change and round-trip through save/load."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from datasets import Dataset
from peft import PeftModel
from PIL import Image

from dflow_trl import DFlowGRPOConfig, DFlowGRPOTrainer
from dflow_trl.models import FudokiForFlow, load_processing_class
from dflow_trl.models.fudoki.checkpoint import load_tokenizer

from .fudoki_fixtures import write_tiny_fudoki_checkpoint

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_fudoki_checkpoint(tmp_path_factory.mktemp("fudoki_rl") / "ckpt")


def _args(tmp_path: Path, **kw) -> DFlowGRPOConfig:
    base = dict(
        output_dir=str(tmp_path / "out"), use_cpu=True, bf16=False, gradient_checkpointing=False,
        per_device_train_batch_size=2, num_generations=2, max_steps=2, logging_steps=1, save_strategy="no",
        report_to="none", learning_rate=5e-2, num_flow_steps=3, include_last_step=True,
        estimator="monte_carlo", num_mc_samples=3, epsilon=0.2,
    )
    base.update(kw)
    return DFlowGRPOConfig(**base)


def _lora():
    from peft import LoraConfig

    return LoraConfig(r=4, lora_alpha=8, target_modules=FudokiForFlow.lora_target_modules)


def _lora_state(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}


def _check_adapter_round_trip(trainer, before, ckpt, tmp_path, task, **load_kw):
    after = _lora_state(trainer.model)
    assert after and max((before[n] - after[n]).abs().max().item() for n in after) > 0, (
        "LoRA adapters did not change"
    )
    trainer.save_model(str(tmp_path / "adapter"))
    base = FudokiForFlow.from_pretrained(str(ckpt), task=task, **load_kw)
    loaded = PeftModel.from_pretrained(base, str(tmp_path / "adapter"))
    reloaded = {n.replace(".default", ""): p for n, p in loaded.named_parameters() if "lora_" in n}
    for name, value in after.items():
        torch.testing.assert_close(reloaded[name.replace(".default", "")], value)


def test_t2i_rl_with_lora(ckpt: Path, tmp_path: Path) -> None:
    def brightness(prompts, completions, completion_ids, **kw):
        return [float(np.asarray(img, dtype=np.float32).mean() / 255) for img in completions]

    ds = Dataset.from_dict({"prompt": ["a red cat", "two dogs"]})
    trainer = DFlowGRPOTrainer(
        model=str(ckpt), reward_funcs=brightness, args=_args(tmp_path, beta=0.01), train_dataset=ds,
        peft_config=_lora(),
    )
    before = _lora_state(trainer.model)
    assert all("language_model" in n for n in before), "LoRA must sit on the language model only"
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logs) == 2 and all(np.isfinite(h["loss"]) for h in logs) and "kl" in logs[0]
    _check_adapter_round_trip(trainer, before, ckpt, tmp_path, "t2i")


def test_understanding_rl_with_lora(ckpt: Path, tmp_path: Path) -> None:
    model = FudokiForFlow.from_pretrained(str(ckpt), task="understanding", answer_length=4)
    tok = load_tokenizer(ckpt)
    img = Image.fromarray((np.random.default_rng(0).random((20, 24, 3)) * 255).astype(np.uint8))

    def likes_low_ids(prompts, completions, completion_ids, **kw):
        assert all(isinstance(c, str) for c in completions)
        return [float(np.mean([t < 100 for t in ids])) for ids in completion_ids]

    ds = Dataset.from_dict({"prompt": ["What is shown?", "Which colour?"], "input_image": [img, img]})
    trainer = DFlowGRPOTrainer(
        model=model, reward_funcs=likes_low_ids, args=_args(tmp_path), train_dataset=ds,
        processing_class=tok, peft_config=_lora(),
    )
    assert trainer.flow_path.vocab_size == model.config.text_config.vocab_size
    before = _lora_state(trainer.model)
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logs) == 2 and all(np.isfinite(h["loss"]) for h in logs)
    _check_adapter_round_trip(trainer, before, ckpt, tmp_path, "understanding", answer_length=4)
    assert load_processing_class(str(ckpt)) is not None
