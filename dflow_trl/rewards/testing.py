"""Tiny random checkpoints in the real on-disk formats, for testing rewards offline (no hub access)."""

from __future__ import annotations

import string
from pathlib import Path

import torch

from .geneval_rules import COCO_LABELS


def save_tiny_clip(path: str | Path, projection_dim: int = 16, image_size: int = 32, seed: int = 0) -> Path:
    """A 2-layer CLIP with a character-level CLIP tokenizer and a PIL image processor, saved with
    save_pretrained."""
    from transformers import CLIPConfig, CLIPImageProcessorPil, CLIPModel, CLIPProcessor, CLIPTokenizer

    path = Path(path)
    chars = [c for c in string.printable if not c.isspace()]
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for suffix in ("", "</w>"):
        for char in chars:
            vocab[char + suffix] = len(vocab)
    tokenizer = CLIPTokenizer(vocab=vocab, merges=[])
    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
    )
    CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(path)
    tower = {"hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": 2, "num_attention_heads": 2}
    config = CLIPConfig(
        text_config={**tower, "vocab_size": len(vocab), "max_position_embeddings": 77,
                     "bos_token_id": 0, "eos_token_id": 1, "pad_token_id": 1},
        vision_config={**tower, "image_size": image_size, "patch_size": 8},
        projection_dim=projection_dim,
    )  # fmt: skip
    torch.manual_seed(seed)
    CLIPModel(config).save_pretrained(path)
    return path


def save_tiny_mask2former(
    path: str | Path,
    labels: tuple[str, ...] = COCO_LABELS,
    num_queries: int = 4,
    image_size: int = 64,
    seed: int = 0,
) -> Path:
    """A tiny Swin-backed Mask2Former instance-segmentation checkpoint with its (PIL) image processor."""
    from transformers import Mask2FormerConfig, Mask2FormerForUniversalSegmentation, SwinConfig
    from transformers.models.mask2former.image_processing_pil_mask2former import Mask2FormerImageProcessorPil

    path = Path(path)
    backbone = SwinConfig(
        image_size=image_size, patch_size=4, embed_dim=16, depths=[1, 1, 1, 1], num_heads=[1, 1, 1, 1],
        window_size=4, out_features=["stage1", "stage2", "stage3", "stage4"],
    )  # fmt: skip
    config = Mask2FormerConfig(
        backbone_config=backbone, feature_size=32, mask_feature_size=32, hidden_dim=32,
        encoder_feedforward_dim=64, dim_feedforward=64, encoder_layers=1, decoder_layers=2,
        num_attention_heads=2, num_queries=num_queries, use_pretrained_backbone=False,
        id2label=dict(enumerate(labels)), label2id={name: i for i, name in enumerate(labels)},
    )  # fmt: skip
    torch.manual_seed(seed)
    Mask2FormerForUniversalSegmentation(config).save_pretrained(path)
    Mask2FormerImageProcessorPil(
        size={"shortest_edge": image_size, "longest_edge": image_size}, size_divisor=32
    ).save_pretrained(path)
    return path
