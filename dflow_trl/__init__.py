"""dflow-trl: reinforcement learning for discrete flow models (discrete Flow-GRPO) on TRL."""

__version__ = "0.1.0"
