"""LAION aesthetic score: CLIP ViT-L/14 image embedding through the "improved aesthetic predictor" MLP
head."""

from __future__ import annotations

import itertools
import os
import threading
from typing import Any

import torch
from torch import nn

from ._inputs import to_pil_images
from .clip_scorers import LazyClip

AESTHETIC_CLIP_MODEL = "openai/clip-vit-large-patch14"
AESTHETIC_HEAD_REPO = "camenduru/improved-aesthetic-predictor"
AESTHETIC_HEAD_FILENAME = "sac+logos+ava1-l14-linearMSE.pth"

# Positions of the Linear layers in the published nn.Sequential; 1, 3 and 5 are parameter-free dropouts.
_LINEAR_INDICES = (0, 2, 4, 6, 7)
_DROPOUTS = {1: 0.2, 3: 0.2, 5: 0.1}


def build_aesthetic_head(dims: tuple[int, ...] = (768, 1024, 128, 64, 16, 1)) -> nn.Sequential:
    """The predictor's MLP: Linear/Dropout stack with no activations, as published."""
    layers: list[nn.Module] = []
    linear = iter(itertools.pairwise(dims))
    for index in range(8):
        if index in _DROPOUTS:
            layers.append(nn.Dropout(_DROPOUTS[index]))
        else:
            layers.append(nn.Linear(*next(linear)))
    return nn.Sequential(*layers)


def load_aesthetic_head(path: str | os.PathLike) -> nn.Sequential:
    """Load a ``sac+logos+ava1-l14-linearMSE.pth``-format state dict (keys
    ``layers.{0,2,4,6,7}.{weight,bias}``)."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict):
        raise ValueError(f"{path}: expected a state dict of tensors, found a {type(state).__name__}")
    # The original predictor saved a LightningModule (prefix "layers."); DDPO-style ports save the bare
    # Sequential.
    state = {key.removeprefix("layers."): value for key, value in state.items()}
    expected = {f"{i}.{p}" for i in _LINEAR_INDICES for p in ("weight", "bias")}
    if set(state) != expected:
        raise ValueError(
            f"{path} is not an improved-aesthetic-predictor head: expected keys "
            f"{sorted('layers.' + k for k in expected)}, found {sorted(state)}"
        )
    dims = (state["0.weight"].shape[1], *(state[f"{i}.weight"].shape[0] for i in _LINEAR_INDICES))
    if dims[-1] != 1:
        raise ValueError(f"{path}: the last layer must output one score, it outputs {dims[-1]}")
    head = build_aesthetic_head(dims)
    try:
        head.load_state_dict(state)
    except RuntimeError as error:
        raise ValueError(f"{path}: layer shapes do not chain ({dims}): {error}") from error
    return head.eval().requires_grad_(False)


class AestheticReward:
    """Aesthetic score (≈ 1–10) of each image; prompts are ignored."""

    def __init__(
        self,
        clip_model: str = AESTHETIC_CLIP_MODEL,
        head_path: str | os.PathLike | None = None,
        *,
        head_repo: str = AESTHETIC_HEAD_REPO,
        head_filename: str = AESTHETIC_HEAD_FILENAME,
        batch_size: int = 32,
        device: str | torch.device | None = None,
        dtype: str | torch.dtype | None = None,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        self.__name__ = "aesthetic"
        self.clip = LazyClip(clip_model, None, device, dtype)
        self.head_path = head_path
        self.head_repo = head_repo
        self.head_filename = head_filename
        self.batch_size = batch_size
        self.head: nn.Sequential | None = None
        self._lock = threading.Lock()

    def _load(self, completions: Any) -> None:
        self.clip.load(completions)
        with self._lock:
            if self.head is not None:
                return
            path = self.head_path
            if path is None:
                from huggingface_hub import hf_hub_download

                path = hf_hub_download(self.head_repo, self.head_filename)
            head = load_aesthetic_head(path)
            width = self.clip.model.config.projection_dim
            if head[0].in_features != width:
                raise ValueError(
                    f"aesthetic head {path} takes {head[0].in_features}-d embeddings "
                    f"but {self.clip.model_name} "
                    f"projects to {width}; the published head needs CLIP ViT-L/14 (768-d)"
                )
            self.head = head.to(self.clip.device)

    @torch.no_grad()
    def __call__(
        self, prompts: list, completions: list, completion_ids: Any = None, **kwargs: Any
    ) -> list[float]:
        self._load(completions)
        images = to_pil_images(completions)
        scores: list[float] = []
        for start in range(0, len(images), self.batch_size):
            embeddings = self.clip.image_embeddings(images[start : start + self.batch_size])
            scores.extend(self.head(embeddings).squeeze(-1).tolist())
        return scores


def aesthetic(**kwargs: Any) -> AestheticReward:
    """Factory for the registry; see :class:`AestheticReward` for arguments."""
    return AestheticReward(**kwargs)
