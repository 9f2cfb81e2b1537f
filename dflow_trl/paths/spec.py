"""Probability paths from the JSON-able specs that model configs store."""

from __future__ import annotations

from typing import Any

import torch

from .base import ProbabilityPath
from .metric import MetricInducedPath
from .mixture import MixturePath


def build_path(spec: dict[str, Any], vocab_size: int, mask_token_id: int | None) -> ProbabilityPath:
    """A probability path from a config spec, as ``DFMTransformerConfig`` stores it.

    ``{"type": "metric", "embeddings": V rows, "c": 3.0, "a": 0.9}``: :class:`MetricInducedPath`
    over those embeddings; ``{"type": "mask" | "uniform", "exponent": 1.0}``: :class:`MixturePath`
    with κ_t = t^exponent and that source (``mask_token_id`` from the spec, else the argument).
    """
    kind = spec.get("type")
    if kind == "metric":
        emb = spec.get("embeddings")
        if emb is None:
            raise ValueError("a 'metric' path spec needs 'embeddings' (V rows)")
        emb_t = torch.as_tensor(emb, dtype=torch.float64)
        if emb_t.shape[0] != vocab_size:
            raise ValueError(
                f"metric path embeddings have {emb_t.shape[0]} rows; "
                f"the canvas vocabulary has {vocab_size}"
            )
        return MetricInducedPath(emb_t, c=spec.get("c", 3.0), a=spec.get("a", 0.9))
    if kind in ("mask", "uniform"):
        return MixturePath(
            vocab_size,
            source=kind,
            mask_token_id=spec.get("mask_token_id", mask_token_id) if kind == "mask" else None,
            scheduler=spec.get("exponent", 1.0),
        )
    raise ValueError(f"unknown path type {kind!r}; use 'metric', 'mask' or 'uniform'")
