"""An enumerable discrete flow model: a table of posterior logits, and its exact ``∇_θ E[R]`` by brute force.

The model's posterior ``p^θ_{1|t}(x1^d | x_t)`` is ``softmax(θ[x_t, d])``, one row of logits per joint
canvas state ``x_t ∈ [V]^D`` and position ``d`` (not given ``t``, as FUDOKI is not), so with
``V^D`` states nothing is approximate: ``E[R] = Σ_{x_0..x_K} p(x_0) Π_k π_θ(x_{k+1} | x_k) R(x_K)``
is a finite sum over every trajectory. The brute force builds ``π_θ`` from ``tests.helpers.brute_kernel``
(the kernel re-derived from docs/method.md §2 with Python loops), never from the library's estimators.
"""

from __future__ import annotations

import itertools
from typing import Any

import torch
from transformers import GenerationConfig, PretrainedConfig, PreTrainedModel

from dflow_trl.models.base import DiscreteFlowModelMixin, FlowInputs
from dflow_trl.paths import MixturePath

from .helpers import brute_kernel

COND_TOKEN = 1  # the one condition token of every sequence (the tiny tokenizer's <sep>)


class TableDFMConfig(PretrainedConfig):
    model_type = "table_dfm"

    def __init__(
        self, vocab: int = 3, canvas: int = 2, init_scale: float = 1.0, seed: int = 0, **kwargs: Any
    ):
        self.vocab, self.canvas, self.init_scale, self.seed = vocab, canvas, init_scale, seed
        kwargs.setdefault("pad_token_id", 0)
        super().__init__(**kwargs)


class TableDFM(DiscreteFlowModelMixin, PreTrainedModel):
    """Posterior logits ``θ[state(x_t), d]`` for a canvas of D tokens in ``[V]``; one condition token."""

    config_class = TableDFMConfig
    canvas_kind = "text"

    def __init__(self, config: TableDFMConfig, path: Any = None) -> None:
        super().__init__(config)
        v, d = config.vocab, config.canvas
        g = torch.Generator().manual_seed(config.seed)
        self.logits = torch.nn.Parameter(
            config.init_scale * torch.randn(v**d, d, v, generator=g, dtype=torch.float64)
        )
        self.register_buffer("place", v ** torch.arange(d - 1, -1, -1), persistent=False)
        self.path = path if path is not None else MixturePath(v, source="uniform")
        self.post_init()
        # TRL writes the pad/eos ids into generation_config, though a DFM never calls generate().
        self.generation_config = GenerationConfig(pad_token_id=0, eos_token_id=0)

    def _init_weights(self, module: torch.nn.Module) -> None:  # the table is initialised in __init__
        pass

    def get_probability_path(self):
        return self.path

    def state_index(self, canvas: torch.LongTensor) -> torch.LongTensor:
        return (canvas * self.place).sum(-1)

    def prepare_flow_inputs(self, prompts, processing_class=None, **columns) -> FlowInputs:
        b, d = len(prompts), self.config.canvas
        ids = torch.cat([torch.full((b, 1), COND_TOKEN), torch.zeros(b, d, dtype=torch.long)], dim=1)
        mask = torch.zeros_like(ids, dtype=torch.bool)
        mask[:, 1:] = True
        return FlowInputs(ids, torch.ones_like(ids), mask)

    def forward(self, input_ids, attention_mask=None, canvas_mask=None, **kwargs) -> torch.Tensor:
        canvas = input_ids[canvas_mask].view(input_ids.shape[0], -1)
        return self.logits[self.state_index(canvas)]

    def canvas_logits(self, input_ids, attention_mask, canvas_mask, **extra):
        return self.forward(input_ids, attention_mask, canvas_mask)

    def decode_canvas(self, canvas, processing_class=None) -> list[str]:
        return [" ".join(map(str, row)) for row in canvas.tolist()]


def all_states(vocab: int, canvas: int) -> torch.LongTensor:
    """``(V^D, D)``: every canvas, in the order of :meth:`TableDFM.state_index`."""
    return torch.tensor(list(itertools.product(range(vocab), repeat=canvas)), dtype=torch.long)


def brute_force_value_and_grad(
    model: TableDFM, reward: torch.Tensor, num_steps: int, time_power: float = 1.0
) -> tuple[float, torch.Tensor]:
    """Exact ``E[R]`` and ``∇_θ E[R]`` (shape of ``model.logits``), summing over every trajectory
    on the grid ``t_k = (k / K)^time_power``.

    ``π_θ(y | x) = Π_d Σ_{x1} softmax(θ[x, d])_{x1} K_{h_k}(x^d → y^d | x1)`` per step (docs/method.md §2),
    with the uniform source ``p(x_0) = V^{-D}``."""
    if getattr(model.path, "source", "uniform") != "uniform":
        raise ValueError("the brute force assumes a uniform source")
    theta = model.logits.detach().clone().requires_grad_(True)
    steps = step_matrices(model, num_steps, time_power, theta)
    n = steps[0].shape[0]
    traj = torch.tensor(list(itertools.product(range(n), repeat=num_steps + 1)), dtype=torch.long)
    prob = torch.full((traj.shape[0],), 1.0 / n, dtype=torch.float64)
    for k, pi in enumerate(steps):
        prob = prob * pi[traj[:, k], traj[:, k + 1]]
    value = (prob * reward.detach().double()[traj[:, -1]]).sum()
    (grad,) = torch.autograd.grad(value, theta)
    return float(value.detach()), grad


def step_matrices(
    model: TableDFM, num_steps: int, time_power: float = 1.0, theta: torch.Tensor | None = None
) -> list[torch.Tensor]:
    """``π_θ(x_{k+1} = s' | x_k = s)`` as one ``(S, S)`` matrix per step (differentiable in ``theta``,
    the model's table by default)."""
    path, v, d = model.path, model.config.vocab, model.config.canvas
    states = all_states(v, d)
    n = states.shape[0]
    post = torch.softmax(model.logits.detach() if theta is None else theta, -1)  # (S, D, V)
    steps = []
    for k in range(num_steps):
        t, t_next = (k / num_steps) ** time_power, ((k + 1) / num_steps) ** time_power
        h = t_next - t
        kern = torch.tensor(
            [[[brute_kernel(path, x, y, x1, t, h) for x1 in range(v)] for y in range(v)] for x in range(v)],
            dtype=torch.float64,
        )  # (x, y, x1)
        per_pos = torch.einsum("sdz,sdyz->sdy", post, kern[states])  # (S, D, y): Σ_{x1} p(x1) K(x^d → y | x1)
        pi = torch.ones(n, n, dtype=torch.float64)
        for pos in range(d):
            pi = pi * per_pos[:, pos, states[:, pos]]
        steps.append(pi)  # (S, S'): π_θ(x_{k+1} = s' | x_k = s)
    return steps
