"""The discrete-flow half of a GRPO batch, carried through TRL's buffers as one typed object."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from ..models.base import FlowInputs
from ..sampling import Trajectory

PREFIX = "flow_"
_INPUT_KEYS = ("input_ids", "attention_mask", "canvas_mask", "uncond_input_ids")


@dataclass
class FlowBatch:
    """What dFlowGRPO adds to a TRL batch of ``B`` rollouts.

    Attributes:
        inputs: the model inputs the rollouts were drawn for.
        trajectory: the recorded rollouts (``x_0 .. x_K`` and the estimator's records).
        step_index: ``(B, T)`` the denoising steps each rollout trains.
        cfg_scale: the classifier-free guidance scale ``w`` the rollouts were drawn with.
        rewards: ``(B, n_funcs)`` per-function rewards, once scored (not carried to the loss).
        skip: ``(B,)`` in the loss, the rollouts not re-scored (``skip_zero_advantage``), or None.
        skip_log_probs: ``(B, T)`` the log-probabilities the skipped rollouts keep (TRL's old ones).

    TRL buffers, shuffles and splits its batch as a dict of row-aligned tensors (and passes 0-dim
    tensors through unchanged). :meth:`to_dict` writes this batch there under ``flow_*`` keys and
    :meth:`from_dict` reads it back, so the trainer's overrides never touch the keys.
    """

    inputs: FlowInputs
    trajectory: Trajectory | None = None
    step_index: torch.LongTensor | None = None
    cfg_scale: float = 0.0
    rewards: torch.Tensor | None = None
    skip: torch.BoolTensor | None = None
    skip_log_probs: torch.Tensor | None = None

    @property
    def batch_size(self) -> int:
        return self.inputs.batch_size

    def index(self, rows: torch.Tensor | slice) -> FlowBatch:
        """The rollouts ``rows`` (rewards and skips excluded)."""
        return FlowBatch(
            inputs=self.inputs.index(rows),
            trajectory=None if self.trajectory is None else self.trajectory.index(rows),
            step_index=None if self.step_index is None else self.step_index[rows],
            cfg_scale=self.cfg_scale,
        )

    def to_dict(self) -> dict[str, torch.Tensor]:
        """Row-aligned tensors for TRL's output dict. The per-step posterior argmax
        (``Trajectory.greedy``) is left out: only the advantages use it, before TRL buffers the batch."""
        if self.trajectory is None or self.step_index is None:
            raise RuntimeError("FlowBatch.to_dict: the batch has no rollouts yet (internal error)")
        out = self.trajectory.to_dict(PREFIX)
        out.pop(PREFIX + "greedy", None)
        out[PREFIX + "step_index"] = self.step_index
        ref = self.step_index
        out[PREFIX + "cfg_scale"] = torch.tensor(float(self.cfg_scale), device=ref.device)
        for key in _INPUT_KEYS:
            value = getattr(self.inputs, key)
            if value is not None:
                out[PREFIX + key] = value
        out.update({f"{PREFIX}extra_{k}": v for k, v in self.inputs.extra.items()})
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> FlowBatch:
        """The batch :meth:`to_dict` wrote into ``data`` (after TRL shuffled and split it)."""
        if PREFIX + "states" not in data:
            raise RuntimeError("DFlowGRPOTrainer: no discrete-flow rollouts in this batch (internal error)")
        extra_prefix = PREFIX + "extra_"
        inputs = FlowInputs(
            **{key: data.get(PREFIX + key) for key in _INPUT_KEYS},
            extra={k[len(extra_prefix) :]: v for k, v in data.items() if k.startswith(extra_prefix)},
        )
        cfg = data[PREFIX + "cfg_scale"]
        return cls(
            inputs=inputs,
            trajectory=Trajectory.from_dict(data, PREFIX),
            step_index=data[PREFIX + "step_index"],
            cfg_scale=float(cfg.reshape(-1)[0]) if isinstance(cfg, torch.Tensor) else float(cfg),
        )
