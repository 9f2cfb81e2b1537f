"""dflow-trl: reinforcement learning for discrete flow models (discrete Flow-GRPO) on TRL."""

from .trainer import DFlowGRPOConfig, DFlowGRPOTrainer

__version__ = "0.1.0"
__all__ = ["DFlowGRPOConfig", "DFlowGRPOTrainer", "__version__"]
