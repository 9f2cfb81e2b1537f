"""Tiny discrete flow models, tokenizers and datasets for tests (built in memory, no network)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from datasets import Dataset
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from dflow_trl.models import DFMTransformer, DFMTransformerConfig

WORDS = [
    "<pad>", "<sep>", "<uncond>", "<mask>", "<unk>", "red", "green", "blue", "square", "circle", "a", "of"
]
IMAGE_VOCAB = 5


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", mask_token="<mask>", eos_token="<pad>"
    )


def path_spec(kind: str) -> dict:
    if kind == "metric":
        g = torch.Generator().manual_seed(0)
        return {
            "type": "metric", "c": 3.0, "a": 0.9,
            "embeddings": torch.randn(IMAGE_VOCAB, 3, generator=g).tolist(),
        }  # fmt: skip
    return {"type": kind, "exponent": 1.0}


def tiny_model(
    path: str = "metric", seed: int = 0, image_shape=(2, 3), task: str = "t2i",
    time_conditioning: bool = False, condition_pooling: bool | str = False, image_position_2d: bool = False,
) -> DFMTransformer:
    torch.manual_seed(seed)
    image_vocab = IMAGE_VOCAB + (1 if path == "mask" else 0)
    spec = path_spec(path)
    if path == "mask":
        spec["mask_token_id"] = IMAGE_VOCAB
    cfg = DFMTransformerConfig(
        text_vocab_size=len(WORDS),
        image_vocab_size=image_vocab,
        image_shape=image_shape,
        text_canvas_length=2,
        max_prompt_length=4,
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
        image_path=spec,
        text_path={"type": "mask"},
        task=task,
        time_conditioning=time_conditioning,
        condition_pooling=condition_pooling,
        image_position_2d=image_position_2d,
    )
    return DFMTransformer(cfg)


def prompt_dataset(n: int = 4) -> Dataset:
    prompts = ["a red square", "a blue circle", "a green square", "a red circle"]
    return Dataset.from_dict(
        {"prompt": [prompts[i % 4] for i in range(n)], "target": [i % 3 for i in range(n)]}
    )


def count_reward(prompts, completions, completion_ids, **kwargs) -> list[float]:
    """Fraction of canvas tokens equal to image token 1 (a reward with a known optimum)."""
    return [sum(t == 1 for t in ids) / len(ids) for ids in completion_ids]


def tiny_recipe(tmp_path) -> Path:
    """A CLI recipe (YAML) that trains a saved tiny uniform-path model with LoRA for 2 logged steps
    on 16 prompts; returns its path (output in ``tmp_path / "out"``)."""
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
learning_rate: 0.01
logging_steps: 1
save_strategy: "no"
report_to: none
use_peft: true
lora_r: 4
lora_alpha: 8
lora_target_modules: [q_proj, v_proj]
"""
    )
    return recipe
