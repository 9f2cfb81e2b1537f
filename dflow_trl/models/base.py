"""What the trainer needs from any discrete flow model.

A discrete flow model (DFM) here is a ``transformers.PreTrainedModel`` that, given a full sequence
``x_t`` (condition + canvas) and an attention mask, returns the posterior logits
``log p^θ_{1|t}(x1^d | x_t, c)`` for the D canvas positions. Condition positions never change; the
canvas positions hold canvas-vocabulary ids (image codes for image canvases, text ids for text
canvases) and evolve along the model's probability path.

Concrete models mix in :class:`DiscreteFlowModelMixin` and implement its abstract methods.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import torch

if TYPE_CHECKING:
    from ..paths.base import ProbabilityPath

CanvasKind = Literal["image", "text"]


@dataclass
class FlowInputs:
    """A batch of model inputs with a canvas to evolve.

    Attributes:
        input_ids: ``(B, L)`` full sequences; canvas positions hold canvas-vocabulary ids.
        attention_mask: ``(B, L)`` 1 for real tokens, 0 for padding.
        canvas_mask: ``(B, L)`` bool, exactly D ``True`` per row: the positions that evolve.
        uncond_input_ids: ``(B, L)`` the same sequences with the condition replaced by the
            model's unconditional token(s), for classifier-free guidance; ``None`` if unsupported.
        extra: further per-sample tensors the forward needs (e.g. ``pixel_values`` for
            understanding), each with leading dimension B.
    """

    input_ids: torch.LongTensor
    attention_mask: torch.LongTensor
    canvas_mask: torch.BoolTensor
    uncond_input_ids: torch.LongTensor | None = None
    extra: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def batch_size(self) -> int:
        return self.input_ids.shape[0]

    @property
    def canvas_length(self) -> int:
        return int(self.canvas_mask[0].sum())

    def get_canvas(self) -> torch.LongTensor:
        """``(B, D)`` canvas tokens of ``input_ids``."""
        return self.input_ids[self.canvas_mask].view(self.batch_size, -1)

    def with_canvas(self, canvas: torch.LongTensor, unconditional: bool = False) -> torch.LongTensor:
        """``input_ids`` (or ``uncond_input_ids``) with the canvas positions set to ``canvas``."""
        base = self._unconditional_ids() if unconditional else self.input_ids
        ids = base.clone()
        ids[self.canvas_mask] = canvas.reshape(-1).to(ids.dtype)
        return ids

    def with_unconditional_rows(self) -> FlowInputs:
        """``2B`` rows: these inputs, then their unconditional version (``input_ids`` replaced by
        ``uncond_input_ids``), so both classifier-free-guidance passes run as one forward."""
        doubled = self.map(lambda v: torch.cat([v, v]))
        doubled.input_ids = torch.cat([self.input_ids, self._unconditional_ids()])
        doubled.uncond_input_ids = None
        return doubled

    def _unconditional_ids(self) -> torch.LongTensor:
        if self.uncond_input_ids is None:
            raise ValueError(
                "This model defines no unconditional input; classifier-free guidance is unavailable."
            )
        return self.uncond_input_ids

    def map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> FlowInputs:
        """The same inputs with ``fn`` applied to every tensor (``None`` stays ``None``)."""

        def apply(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else fn(t)

        return FlowInputs(
            input_ids=apply(self.input_ids),
            attention_mask=apply(self.attention_mask),
            canvas_mask=apply(self.canvas_mask),
            uncond_input_ids=apply(self.uncond_input_ids),
            extra={k: apply(v) for k, v in self.extra.items()},
        )

    def repeat_interleave(self, n: int) -> FlowInputs:
        """Each sample repeated ``n`` times in a row (GRPO groups)."""
        return self.map(lambda t: t.repeat_interleave(n, dim=0))

    def index(self, idx: torch.Tensor | slice) -> FlowInputs:
        """The sub-batch ``idx``."""
        return self.map(lambda t: t[idx])

    def to(self, device: torch.device | str) -> FlowInputs:
        return self.map(lambda t: t.to(device))


class DiscreteFlowModelMixin:
    """The interface a ``PreTrainedModel`` implements to be trained by ``DFlowGRPOTrainer``.

    Implementations define:

    * :attr:`canvas_kind` — ``"image"`` (completions are PIL images) or ``"text"`` (strings);
    * :meth:`get_probability_path` — the path ``p_t(x | x1)`` of the canvas;
    * :meth:`prepare_flow_inputs` — prompts (and dataset columns) → :class:`FlowInputs` with a
      placeholder canvas;
    * :meth:`canvas_logits` — ``(B, D, V)`` posterior logits for the canvas, which ``forward(input_ids,
      attention_mask, canvas_mask=…, **extra)`` returns (the rollout and the loss call ``forward``,
      so DDP and PEFT wrappers see every call);
    * :meth:`decode_canvas` — final canvas tokens → PIL images or strings.

    Optional, with the defaults below:

    * :attr:`wants_flow_time` — ``True`` if ``forward`` takes the flow time as ``flow_time=t``;
    * :attr:`task` and :meth:`set_task` — for a model with several canvases (text-to-image and
      understanding): which one it runs, and switching it (evaluation switches and restores it).
    """

    canvas_kind: CanvasKind = "image"
    wants_flow_time: bool = False
    task: str | None = None

    def set_task(self, task: str) -> DiscreteFlowModelMixin:
        raise NotImplementedError(
            f"{type(self).__name__} has one canvas; there is no task {task!r} to switch to"
        )

    def get_probability_path(self) -> ProbabilityPath:
        raise NotImplementedError

    def prepare_flow_inputs(
        self, prompts: list[Any], processing_class: Any = None, **columns: list[Any]
    ) -> FlowInputs:
        raise NotImplementedError

    def canvas_logits(
        self,
        input_ids: torch.LongTensor,
        attention_mask: torch.LongTensor,
        canvas_mask: torch.BoolTensor,
        **extra: torch.Tensor,
    ) -> torch.Tensor:
        raise NotImplementedError

    def decode_canvas(self, canvas: torch.LongTensor, processing_class: Any = None) -> list[Any]:
        raise NotImplementedError


REQUIRED_METHODS = ("get_probability_path", "prepare_flow_inputs", "canvas_logits", "decode_canvas")


def check_flow_model(model: Any) -> None:
    """Raise ``TypeError`` naming what is missing if ``model`` lacks the discrete-flow interface."""
    base = getattr(model, "get_base_model", None)
    inner = base() if callable(base) else model
    missing = [
        name
        for name in REQUIRED_METHODS
        if not callable(getattr(inner, name, None))
        or getattr(type(inner), name, None) is getattr(DiscreteFlowModelMixin, name)
    ]
    if missing or getattr(inner, "canvas_kind", None) not in ("image", "text"):
        raise TypeError(
            f"{type(inner).__name__} is not a discrete flow model usable by DFlowGRPOTrainer: "
            "it must subclass "
            f"dflow_trl.models.DiscreteFlowModelMixin and implement {', '.join(missing or REQUIRED_METHODS)} "
            "and set canvas_kind to 'image' or 'text'. Use dflow_trl.models.DFMTransformer or "
            "dflow_trl.models.FudokiForFlow, or wrap your model (see docs/trainer.md)."
        )
