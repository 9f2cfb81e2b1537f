"""Discrete flow models: the trainer's interface and the models that implement it."""

from .base import DiscreteFlowModelMixin, FlowInputs, check_flow_model
from .dfm_transformer import DFMTransformer, DFMTransformerConfig, build_path
from .loading import load_flow_model, load_processing_class

__all__ = [
    "DFMTransformer",
    "DFMTransformerConfig",
    "DiscreteFlowModelMixin",
    "FlowInputs",
    "build_path",
    "check_flow_model",
    "load_flow_model",
    "load_processing_class",
]
