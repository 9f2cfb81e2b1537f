"""Held-out evaluation of a ShapeWorld discrete flow model: GenEval-style text-to-image scores and
understanding (VQA) accuracy, sampled with :func:`dflow_trl.rollout.generate`.

The raw test split is mostly colour attribution, so a mean over it says little about the other
categories; :func:`balanced_t2i_eval_set` draws an equal number of prompts per category.
"""

from __future__ import annotations

import itertools
import math
import random
from collections import defaultdict
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from datasets import Dataset

from ...rollout import generate
from .datasets import make_t2i_dataset
from .prompts import TAGS
from .scoring import score_t2i
from .tokenizer import decode_answer, normalize_answer

__all__ = [
    "balanced_t2i_eval_set",
    "evaluate_t2i",
    "evaluate_vqa",
    "standard_error",
    "stratified_standard_error",
]


def balanced_t2i_eval_set(split: str = "test", per_tag: int = 10, seed: int = 0) -> Dataset:
    """``per_tag`` prompts of every GenEval category of ``split`` (columns ``prompt``, ``tag``,
    ``metadata``), in category order.

    Categories with fewer prompts than ``per_tag`` (the test split has 5 single-object and 5
    counting prompts) repeat them cyclically, so every category weighs the same; a repeated prompt
    is sampled with different noise. Larger ones keep a seeded random subset.
    """
    if per_tag < 1:
        raise ValueError(f"per_tag must be >= 1, got {per_tag}")
    full = make_t2i_dataset(split)
    rng = random.Random(f"balanced-{split}-{seed}")
    rows: list[int] = []
    for tag in TAGS:
        idx = [i for i, t in enumerate(full["tag"]) if t == tag]
        if not idx:
            continue
        if len(idx) >= per_tag:
            rows += sorted(rng.sample(idx, per_tag))
        else:
            rows += list(itertools.islice(itertools.cycle(idx), per_tag))
    return full.select(rows)


@contextmanager
def _task(model: Any, task: str) -> Iterator[Any]:
    """The base model switched to ``task`` for the block, then switched back."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if not hasattr(base, "set_task"):
        raise ValueError(
            f"{type(base).__name__} has no set_task; evaluation needs a DFMTransformer-like model"
        )
    previous = base.task
    base.set_task(task)
    try:
        yield base
    finally:
        base.set_task(previous)


@contextmanager
def _merged_adapter(model: Any) -> Iterator[None]:
    """A PEFT model's adapter merged into its (unquantised) base weights for the block, then unmerged:
    sampling then runs the base layers alone, without each adapter's extra matmuls (on the
    ShapeWorld model a LoRA-wrapped evaluation took 1.4× the merged one's time). The base weights
    are restored bit for bit (unmerging alone would leave float rounding in them)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else None
    if base is None or not hasattr(model, "merge_adapter") or getattr(base, "hf_quantizer", None) is not None:
        yield
        return
    saved = {name: p.detach().clone() for name, p in base.named_parameters() if not p.requires_grad}
    model.merge_adapter()
    try:
        yield
    finally:
        model.unmerge_adapter()
        with torch.no_grad():
            for name, p in base.named_parameters():
                if name in saved:
                    p.copy_(saved[name])


def _check_common(
    dataset: Dataset, columns: Sequence[str], num_steps: int, seeds: Sequence[int], batch_size: int
) -> None:
    missing = [c for c in columns if c not in dataset.column_names]
    if missing:
        raise ValueError(f"dataset lacks column(s) {missing}; it has {dataset.column_names}")
    if len(dataset) == 0:
        raise ValueError("cannot evaluate on an empty dataset")
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    if not seeds:
        raise ValueError("seeds must name at least one seed")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")


def _batch_seed(seed: int, start: int) -> int:
    # One generator per batch, distinct across seeds and batches, so results do not depend on
    # what was sampled before.
    return seed * 1_000_003 + start


def _mean_by(keys: Sequence[str], values: Sequence[float]) -> dict[str, float]:
    sums: dict[str, float] = defaultdict(float)
    counts: dict[str, int] = defaultdict(int)
    for k, v in zip(keys, values):
        sums[k] += v
        counts[k] += 1
    return {k: sums[k] / counts[k] for k in sorted(sums)}


def _sampled_batches(
    model: Any, tokenizer: Any, prompts: Sequence[str], seeds: Sequence[int], batch_size: int,
    columns: dict[str, Sequence[Any]] | None = None, **sampling: Any,
) -> Iterator[tuple[int, torch.Tensor]]:
    """``(start, canvas)`` for every seed and batch of ``prompts``, each batch with its own seed."""
    columns = columns or {}
    for seed in seeds:
        for s in range(0, len(prompts), batch_size):
            batch_columns = {k: v[s : s + batch_size] for k, v in columns.items()}
            canvas, _ = generate(
                model,
                prompts[s : s + batch_size],
                tokenizer,
                seed=_batch_seed(seed, s),
                **sampling,
                **batch_columns,
            )
            yield s, canvas.cpu()


def standard_error(values: Sequence[float]) -> float:
    """Standard error of the mean of ``values`` (sample standard deviation / √n); NaN for fewer than
    two values, whose spread is unknown, not zero."""
    n = len(values)
    if n < 2:
        return math.nan
    mean = sum(values) / n
    return (sum((v - mean) ** 2 for v in values) / (n - 1) / n) ** 0.5


def stratified_standard_error(values: Sequence[float], strata: Sequence[str]) -> float:
    """Standard error of the mean of ``values`` when each stratum's share of them is fixed by design.

    With n_c values in stratum c (variance s_c², N in all) the mean is Σ_c (n_c/N) m_c, so
    SE = √(Σ_c (n_c/N)² s_c²/n_c). A balanced evaluation set fixes how many prompts each category
    has, so how the categories differ from each other is not sampling noise, and
    :func:`standard_error` (which counts it) overstates the error. NaN when a stratum holds one
    value: its variance cannot be estimated (``--eval-per-tag 1``).
    """
    if len(values) != len(strata):
        raise ValueError(f"got {len(values)} values but {len(strata)} strata")
    groups: dict[str, list[float]] = defaultdict(list)
    for v, c in zip(values, strata):
        groups[c].append(v)
    n = len(values)
    return sum((len(g) / n) ** 2 * standard_error(g) ** 2 for g in groups.values()) ** 0.5


def evaluate_t2i(
    model: Any,
    tokenizer: Any,
    dataset: Dataset,
    num_steps: int = 20,
    seeds: Sequence[int] = (0,),
    cfg_scale: float = 0.0,
    batch_size: int = 32,
    temperature: float = 1.0,
    return_samples: bool = False,
    time_power: float = 1.0,
) -> dict[str, Any]:
    """Text-to-image scores of ``model`` on ``dataset`` (columns ``prompt``, ``tag``, ``metadata``),
    one sample per prompt and seed (GenEval draws 4 per prompt: pass 4 seeds).

    Returns ``strict`` and ``partial`` (mean over prompts, each prompt averaged over ``seeds``),
    ``strict_se`` / ``partial_se`` (their standard errors over prompts within each category,
    :func:`stratified_standard_error`: the spread of per-prompt means holds both the sampling noise
    and how prompts of a category differ; the categories' shares are fixed by the dataset), ``per_category`` /
    ``per_category_partial`` (means per tag), ``geneval`` (mean of the per-category strict scores,
    GenEval's overall), ``per_prompt`` (each prompt's strict score), ``n`` (prompts) and
    ``samples_per_prompt``. ``return_samples`` adds ``samples`` (``samples[i][j]``: the grid of
    prompt ``i`` under seed ``j``, as a list) and ``sample_strict`` (its strict score), so pictures
    and sample files show exactly what was scored. ``time_power``: the sampler's time grid
    ``t_k = (k / K)^power`` (``dflow_trl.sampling.time_grid``).
    """
    _check_common(dataset, ("prompt", "tag", "metadata"), num_steps, seeds, batch_size)
    prompts, tags, metas = dataset["prompt"], dataset["tag"], dataset["metadata"]
    strict = [0.0] * len(prompts)
    partial = [0.0] * len(prompts)
    samples: list[list[list[int]]] = [[] for _ in prompts]
    sample_strict: list[list[float]] = [[] for _ in prompts]
    with _task(model, "t2i"), _merged_adapter(model):
        batches = _sampled_batches(
            model, tokenizer, prompts, seeds, batch_size, num_steps=num_steps, cfg_scale=cfg_scale,
            temperature=temperature, time_power=time_power,
        )
        for s, canvas in batches:
            for i, grid in enumerate(canvas):
                st, pa, _ = score_t2i(grid, metas[s + i])
                strict[s + i] += st / len(seeds)
                partial[s + i] += pa / len(seeds)
                if return_samples:
                    samples[s + i].append(grid.tolist())
                    sample_strict[s + i].append(st)
    per_category = _mean_by(tags, strict)
    extra = {"samples": samples, "sample_strict": sample_strict} if return_samples else {}
    return {
        "strict": sum(strict) / len(strict),
        "strict_se": stratified_standard_error(strict, tags),
        "partial": sum(partial) / len(partial),
        "partial_se": stratified_standard_error(partial, tags),
        "geneval": sum(per_category.values()) / len(per_category),
        "per_category": per_category,
        "per_category_partial": _mean_by(tags, partial),
        "per_prompt": strict,
        "n": len(prompts),
        "samples_per_prompt": len(seeds),
        **extra,
    }


def evaluate_vqa(
    model: Any,
    tokenizer: Any,
    dataset: Dataset,
    num_steps: int = 4,
    seeds: Sequence[int] = (0,),
    batch_size: int = 64,
    temperature: float = 1.0,
) -> dict[str, Any]:
    """Exact-match answer accuracy of ``model`` on ``dataset`` (columns ``prompt``, ``scene_tokens``,
    ``answer``, ``qtype``): ``accuracy`` (averaged over ``seeds``), ``accuracy_se`` (its standard
    error over questions), ``per_qtype``, ``per_question`` and ``n``."""
    _check_common(dataset, ("prompt", "scene_tokens", "answer", "qtype"), num_steps, seeds, batch_size)
    prompts, scenes = dataset["prompt"], dataset["scene_tokens"]
    answers = [normalize_answer(a) for a in dataset["answer"]]
    correct = [0.0] * len(prompts)
    with _task(model, "understanding") as base, _merged_adapter(model):
        batches = _sampled_batches(
            model, tokenizer, prompts, seeds, batch_size, {base.config.image_column: scenes},
            num_steps=num_steps, temperature=temperature,
        )
        for s, canvas in batches:
            for i, ids in enumerate(canvas.tolist()):
                correct[s + i] += float(decode_answer(ids, tokenizer) == answers[s + i]) / len(seeds)
    return {
        "accuracy": sum(correct) / len(correct),
        "accuracy_se": standard_error(correct),
        "per_qtype": _mean_by(dataset["qtype"], correct),
        "per_question": correct,
        "n": len(prompts),
    }
