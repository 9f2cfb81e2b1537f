"""Normalising what TRL hands a reward function: images, texts, prompts, devices."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image

# Keyword arguments TRL's GRPOTrainer adds to every reward call; they are not dataset columns.
TRL_EXTRA_KWARGS = frozenset({"trainer_state", "log_extra", "log_metric", "environments"})


def to_pil_images(completions: Any) -> list[Image.Image]:
    """Turn image completions (PIL images, HWC uint8 arrays, CHW/HWC tensors in [0, 1]) into RGB PIL
    images."""
    if isinstance(completions, torch.Tensor) and completions.dim() == 3:
        completions = [completions]
    if isinstance(completions, np.ndarray) and completions.ndim == 3:
        completions = [completions]
    images = []
    for index, item in enumerate(completions):
        images.append(_one_pil(item, index))
    return images


def _one_pil(item: Any, index: int) -> Image.Image:
    if isinstance(item, Image.Image):
        return item if item.mode == "RGB" else item.convert("RGB")
    if isinstance(item, torch.Tensor):
        tensor = item.detach().to("cpu")
        if tensor.dim() == 3 and tensor.shape[0] in (1, 3) and tensor.shape[-1] not in (1, 3):
            tensor = tensor.permute(1, 2, 0)
        if tensor.is_floating_point():
            tensor = (tensor.float().clamp(0, 1) * 255).round()
        item = tensor.to(torch.uint8).numpy()
    if isinstance(item, np.ndarray):
        array = item
        if array.dtype != np.uint8:
            if np.issubdtype(array.dtype, np.floating):
                array = (np.clip(array, 0, 1) * 255).round()
            array = array.astype(np.uint8)
        if array.ndim == 3 and array.shape[-1] == 1:
            array = array[..., 0]
        if array.ndim not in (2, 3):
            raise ValueError(
                f"completion {index}: expected an HxW or HxWxC image array, got shape {array.shape}"
            )
        return Image.fromarray(array).convert("RGB")
    raise TypeError(
        f"completion {index} is a {type(item).__name__}, not an image; image rewards need PIL images, "
        "HWC uint8 arrays or CHW float tensors in [0, 1] as completions"
    )


def completion_text(completion: Any) -> str:
    """The text of a completion: a plain string or TRL's conversational list of messages."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, Sequence) and completion and isinstance(completion[-1], dict):
        return _message_text(completion[-1])
    if isinstance(completion, dict):
        return _message_text(completion)
    raise TypeError(
        f"expected a text completion (str or list of chat messages), got {type(completion).__name__}; "
        "text rewards cannot score image completions"
    )


def prompt_text(prompt: Any) -> str:
    """The text of a prompt: a string, or the last user message of a conversation."""
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, Sequence) and prompt and isinstance(prompt[0], dict):
        user = [m for m in prompt if m.get("role") == "user"] or list(prompt)
        return _message_text(user[-1])
    raise TypeError(f"expected a text prompt (str or list of chat messages), got {type(prompt).__name__}")


def _message_text(message: dict) -> str:
    content = message.get("content", "")
    if isinstance(content, str):
        return content
    # Multimodal messages hold a list of parts; only the text parts carry words.
    return " ".join(
        part.get("text", "") for part in content if isinstance(part, dict) and part.get("type") == "text"
    )


def resolve_device(device: str | torch.device | None, completions: Any = None) -> torch.device:
    """The device to score on: the given one, else that of tensor completions, else the current GPU,
    else CPU."""
    if device is not None:
        return torch.device(device)
    first = completions[0] if isinstance(completions, Sequence) and len(completions) else completions
    if isinstance(first, torch.Tensor):
        return first.device
    if torch.cuda.is_available():
        # accelerate sets the current device per process, so this follows the policy's GPU.
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def resolve_dtype(dtype: str | torch.dtype | None, completions: Any = None) -> torch.dtype:
    """The scorer's dtype: the given one, else that of floating tensor completions, else float32."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if isinstance(dtype, str):
        resolved = getattr(torch, dtype.removeprefix("torch."), None)
        if not isinstance(resolved, torch.dtype) or not resolved.is_floating_point:
            raise ValueError(
                f"dtype {dtype!r} is not a torch floating dtype; use e.g. 'float32' or 'bfloat16'"
            )
        return resolved
    first = completions[0] if isinstance(completions, Sequence) and len(completions) else completions
    if isinstance(first, torch.Tensor) and first.is_floating_point():
        return first.dtype
    return torch.float32


def pooled_features(output: Any) -> torch.Tensor:
    """CLIP feature getters return a tensor in transformers 4 and a model output in 5 (projection in
    pooler_output)."""
    if isinstance(output, torch.Tensor):
        return output
    return output.pooler_output


def column(kwargs: dict[str, Any], name: str, n: int, reward_name: str) -> list[Any]:
    """A dataset column from the reward kwargs, checked to have one entry per completion."""
    if name not in kwargs:
        present = sorted(k for k in kwargs if k not in TRL_EXTRA_KWARGS)
        raise KeyError(
            f"reward {reward_name!r} needs a dataset column {name!r}, but the batch has only {present}; "
            f"add the column to the dataset or pass the column name to the reward's factory"
        )
    values = list(kwargs[name])
    if len(values) != n:
        raise ValueError(f"column {name!r} has {len(values)} entries for {n} completions")
    return values
