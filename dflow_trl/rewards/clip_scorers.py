"""Prompt–image alignment rewards on transformers' CLIP: PickScore and CLIP score."""

from __future__ import annotations

import threading
from typing import Any

import torch

from ._inputs import pooled_features, prompt_text, resolve_device, resolve_dtype, to_pil_images

PICKSCORE_MODEL = "yuvalkirstain/PickScore_v1"
PICKSCORE_PROCESSOR = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"
CLIP_SCORE_MODEL = "openai/clip-vit-large-patch14"


class LazyClip:
    """A CLIP model and processor loaded on first use, then kept on one device and dtype."""

    def __init__(self, model: str, processor: str | None, device: Any, dtype: Any) -> None:
        self.model_name = model
        self.processor_name = processor or model
        self._device = device
        self._dtype = dtype
        self._lock = threading.Lock()
        self.model: Any = None
        self.processor: Any = None
        self.device: torch.device | None = None

    def load(self, completions: Any = None) -> None:
        with self._lock:
            if self.model is not None:
                return
            from transformers import AutoProcessor, CLIPModel

            device = resolve_device(self._device, completions)
            dtype = resolve_dtype(self._dtype, completions)
            self.processor = AutoProcessor.from_pretrained(self.processor_name)
            model = CLIPModel.from_pretrained(self.model_name, dtype=dtype)
            self.model = model.to(device).eval().requires_grad_(False)
            self.device = device

    @torch.no_grad()
    def image_embeddings(self, images: list) -> torch.Tensor:
        """L2-normalised image embeddings, float32."""
        pixels = self.processor(images=images, return_tensors="pt")["pixel_values"]
        pixels = pixels.to(self.device, self.model.dtype)
        features = pooled_features(self.model.get_image_features(pixel_values=pixels)).float()
        return torch.nn.functional.normalize(features, dim=-1)

    @torch.no_grad()
    def text_embeddings(self, texts: list[str]) -> torch.Tensor:
        """L2-normalised text embeddings, float32 (texts truncated to CLIP's 77 tokens)."""
        tokens = self.processor(text=texts, padding=True, truncation=True, max_length=77, return_tensors="pt")
        tokens = {k: v.to(self.device) for k, v in tokens.items() if k in ("input_ids", "attention_mask")}
        features = pooled_features(self.model.get_text_features(**tokens)).float()
        return torch.nn.functional.normalize(features, dim=-1)


class ClipAlignmentReward:
    """Reward = scale × cosine(prompt, image), optionally multiplied by CLIP's learned logit scale.

    A plain callable rather than an ``nn.Module``: TRL treats module rewards as sequence classifiers.
    """

    def __init__(
        self,
        model: str,
        processor: str | None = None,
        *,
        name: str,
        use_logit_scale: bool = False,
        scale: float = 1.0,
        batch_size: int = 32,
        device: str | torch.device | None = None,
        dtype: str | torch.dtype | None = None,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        self.__name__ = name
        self.clip = LazyClip(model, processor, device, dtype)
        self.use_logit_scale = use_logit_scale
        self.scale = float(scale)
        self.batch_size = batch_size

    def __call__(
        self, prompts: list, completions: list, completion_ids: Any = None, **kwargs: Any
    ) -> list[float]:
        if len(prompts) != len(completions):
            raise ValueError(f"{self.__name__}: {len(prompts)} prompts for {len(completions)} completions")
        self.clip.load(completions)
        images = to_pil_images(completions)
        texts = [prompt_text(p) for p in prompts]
        scores: list[float] = []
        for start in range(0, len(images), self.batch_size):
            stop = start + self.batch_size
            image_emb = self.clip.image_embeddings(images[start:stop])
            text_emb = self.clip.text_embeddings(texts[start:stop])
            similarity = (image_emb * text_emb).sum(-1)
            if self.use_logit_scale:
                similarity = similarity * self.clip.model.logit_scale.float().exp()
            scores.extend((similarity * self.scale).tolist())
        return scores


def pickscore(
    model: str = PICKSCORE_MODEL,
    processor: str = PICKSCORE_PROCESSOR,
    *,
    scale: float = 1.0,
    batch_size: int = 32,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
) -> ClipAlignmentReward:
    """PickScore: CLIP-H fine-tuned on Pick-a-Pic; logit_scale × cosine (≈ 18–24 for typical images).

    Flow-GRPO trains on ``scale=1/26``; the default keeps the raw values papers report.
    """
    return ClipAlignmentReward(
        model,
        processor,
        name="pickscore",
        use_logit_scale=True,
        scale=scale,
        batch_size=batch_size,
        device=device,
        dtype=dtype,
    )


def clip_score(
    model: str = CLIP_SCORE_MODEL,
    processor: str | None = None,
    *,
    scale: float = 1.0,
    batch_size: int = 32,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
) -> ClipAlignmentReward:
    """CLIP score: scale × cosine similarity of prompt and image embeddings (``scale=100`` gives
    torchmetrics' scale)."""
    return ClipAlignmentReward(
        model,
        processor,
        name="clip_score",
        use_logit_scale=False,
        scale=scale,
        batch_size=batch_size,
        device=device,
        dtype=dtype,
    )
