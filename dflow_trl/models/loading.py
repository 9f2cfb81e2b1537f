"""Load a saved discrete flow model (and its tokenizer) by the ``model_type`` in its config."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from transformers import AutoConfig, AutoModel, AutoTokenizer

from .dfm_transformer import DFMTransformer, DFMTransformerConfig

AutoConfig.register(DFMTransformerConfig.model_type, DFMTransformerConfig, exist_ok=True)
AutoModel.register(DFMTransformerConfig, DFMTransformer, exist_ok=True)


def _model_type(path: str) -> str:
    cfg = os.path.join(path, "config.json")
    if not os.path.isfile(cfg):
        raise ValueError(
            f"{path!r} is not a saved discrete flow model (no config.json). "
            "Models cannot be downloaded here: "
            "pass a local folder written by save_pretrained, or a model object"
        )
    with open(cfg) as f:
        return json.load(f).get("model_type", "")


def load_flow_model(path: str, quantization_config: Any = None, **kwargs: Any) -> Any:
    """Load the discrete flow model saved at ``path`` (``dfm_transformer`` or FUDOKI's ``multi_modality``)."""
    kind = _model_type(path)
    if quantization_config is not None:
        kwargs["quantization_config"] = quantization_config
    if kind == DFMTransformerConfig.model_type:
        return _named_weight_errors(path, DFMTransformer.from_pretrained, **kwargs)
    if kind in ("multi_modality", "janus"):  # FUDOKI's own layout, or one saved by FudokiForFlow
        from .fudoki.modeling import FudokiForFlow

        return _named_weight_errors(path, FudokiForFlow.from_pretrained, **kwargs)
    raise ValueError(
        f"{path!r} holds a {kind!r} model, which is not a discrete flow model dflow-trl knows; "
        "expected 'dfm_transformer' or FUDOKI's 'multi_modality'"
    )


def _named_weight_errors(path: str, load: Any, **kwargs: Any) -> Any:
    """``load(path)``, with a corrupt or truncated weights file named: safetensors' own error names
    no file (``Error while deserializing header: ...``)."""
    from safetensors import SafetensorError

    try:
        return load(path, **kwargs)
    except SafetensorError as err:
        files = sorted(str(p) for p in Path(path).glob("*.safetensors")) if Path(path).is_dir() else [path]
        raise OSError(
            f"cannot read the weights of {path!r} ({', '.join(files) or 'no .safetensors file'}): {err}. "
            "The file is corrupt or truncated (e.g. an interrupted save or download); save or copy it again"
        ) from err


def load_processing_class(path: str) -> Any:
    """The tokenizer saved beside the model (``None`` if there is none)."""
    if _model_type(path) == "multi_modality":
        from .fudoki.checkpoint import load_tokenizer

        return load_tokenizer(path)
    try:
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError, TypeError):
        return None
