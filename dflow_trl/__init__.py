"""dflow-trl: reinforcement learning for discrete flow models (discrete Flow-GRPO) on TRL."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .trainer import DFlowGRPOConfig, DFlowGRPOTrainer

__version__ = "0.1.0"
__all__ = ["DFlowGRPOConfig", "DFlowGRPOTrainer", "__version__"]


def __getattr__(name: str) -> Any:
    # TRL, PEFT and bitsandbytes take seconds to import: load them when the trainer is asked for,
    # so `dflow-trl --help` and the light submodules start at once.
    if name in ("DFlowGRPOConfig", "DFlowGRPOTrainer"):
        from . import trainer

        return getattr(trainer, name)
    raise AttributeError(f"module 'dflow_trl' has no attribute {name!r}")
