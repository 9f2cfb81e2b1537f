"""dFlowGRPO as a TRL trainer."""

from .config import DFlowGRPOConfig
from .dflow_grpo_trainer import DFlowGRPOTrainer

__all__ = ["DFlowGRPOConfig", "DFlowGRPOTrainer"]
