"""Discrete flow models: the trainer's interface and the models that implement it."""

from .base import DiscreteFlowModelMixin, FlowInputs, check_flow_model
from .dfm_transformer import DFMTransformer, DFMTransformerConfig
from .loading import load_flow_model, load_processing_class


def __getattr__(name: str):
    # FUDOKI pulls in transformers' Janus classes: import it only when asked for.
    if name in ("FudokiForFlow", "FudokiCheckpointError", "is_fudoki_checkpoint"):
        from . import fudoki

        return getattr(fudoki, name)
    raise AttributeError(name)


__all__ = [
    "DFMTransformer",
    "DFMTransformerConfig",
    "DiscreteFlowModelMixin",
    "FlowInputs",
    "FudokiCheckpointError",
    "FudokiForFlow",
    "check_flow_model",
    "is_fudoki_checkpoint",
    "load_flow_model",
    "load_processing_class",
]
