"""Tiny discrete flow models, tokenizers and datasets for tests (built in memory, no network)."""

from __future__ import annotations

import torch
from datasets import Dataset
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from dflow_trl.models import DFMTransformer, DFMTransformerConfig

WORDS = ["<pad>", "<sep>", "<uncond>", "<mask>", "<unk>", "red", "green", "blue", "square", "circle", "a", "of"]
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
        return {"type": "metric", "c": 3.0, "a": 0.9, "embeddings": torch.randn(IMAGE_VOCAB, 3, generator=g).tolist()}
    return {"type": kind, "exponent": 1.0}


def tiny_model(
    path: str = "metric", seed: int = 0, image_shape=(2, 3), task: str = "t2i", time_conditioning: bool = False,
    condition_pooling: bool | str = False, image_position_2d: bool = False,
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
    return Dataset.from_dict({"prompt": [prompts[i % 4] for i in range(n)], "target": [i % 3 for i in range(n)]})


def count_reward(prompts, completions, completion_ids, **kwargs) -> list[float]:
    """Fraction of canvas tokens equal to image token 1 (a reward with a known optimum)."""
    return [sum(t == 1 for t in ids) / len(ids) for ids in completion_ids]
