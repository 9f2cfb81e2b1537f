"""The model card a dFlowGRPO run writes beside its weights (``README.md``).

TRL's card is written for language models: its quick start is a ``pipeline("text-generation")``
that cannot load a discrete flow model, and a local base model shows as ``None``. This card names
the base model (Hub id or local folder), the flow settings the policy was trained with, and a quick
start that loads the weights onto the DFM and samples with the same settings.
"""

from __future__ import annotations

import os
from importlib.metadata import PackageNotFoundError, version
from typing import Any

from huggingface_hub import ModelCard, ModelCardData


def _version(package: str) -> str:
    try:
        return version(package)
    except PackageNotFoundError:
        return "not installed"


def base_model_of(flow_model: Any) -> tuple[str | None, str]:
    """``(hub_id, shown_name)`` of the model the run started from.

    ``hub_id`` is set only for a Hub repository id (a local folder is not one); ``shown_name`` is
    what the card prints either way."""
    name = getattr(getattr(flow_model, "config", None), "_name_or_path", "") or ""
    if not name:
        return None, f"an in-memory `{type(flow_model).__name__}`"
    if os.path.isdir(name) or os.path.isabs(name) or name.startswith("."):
        return None, f"the local folder `{os.path.basename(os.path.normpath(name))}`"
    return name, f"[{name}](https://huggingface.co/{name})"


def _flow_settings(args: Any, path: Any, peft_config: Any) -> list[tuple[str, str]]:
    rows = [
        ("probability path", f"`{path!r}`"),
        ("Euler steps K (training / evaluation)", f"{args.num_flow_steps} / {args.num_flow_steps_eval}"),
        ("time grid", f"t_k = (k/K)^{args.flow_time_power:g}"),
        ("estimator of log π_θ", f"`{args.estimator}`"),
    ]
    if args.estimator == "top_k":
        rows.append(("top-k head / tail draws", f"{args.top_k_size} / {args.num_mc_samples}"))
    elif args.estimator == "monte_carlo":
        rows.append(("posterior draws n", str(args.num_mc_samples)))
    rows += [
        ("trained steps", f"`{args.train_steps}`, last step {'on' if args.include_last_step else 'off'}"),
        ("CFG scale / temperature", f"{args.cfg_scale:g} / {args.temperature:g}"),
        ("rollouts per prompt (G)", str(args.num_generations)),
        ("loss type / β (KL) / ε", f"`{args.loss_type}` / {args.beta:g} / {args.epsilon:g}"),
        ("learning rate / max steps", f"{args.learning_rate:g} / {args.max_steps}"),
    ]
    if peft_config is not None:
        targets = getattr(peft_config, "target_modules", None)
        targets = sorted(targets) if isinstance(targets, (set, list, tuple)) else targets
        rows.append(
            ("LoRA r / α / targets", f"{peft_config.r} / {peft_config.lora_alpha} / `{targets}`")
        )
    return rows


def _example_prompt(dataset: Any) -> str:
    try:
        prompt = dataset[0]["prompt"]
    except (TypeError, KeyError, IndexError):
        prompt = None
    return prompt if isinstance(prompt, str) else "a photo of a cat"


def _quick_start(base_ref: str, is_adapter: bool, args: Any, repo: str, prompt: str) -> str:
    load = [
        "from dflow_trl.models import load_flow_model",
        "from dflow_trl.models.loading import load_processing_class",
        "from dflow_trl.rollout import generate",
    ]
    if is_adapter:
        load.insert(0, "from peft import PeftModel")
        body = [
            f'base = load_flow_model("{base_ref}")',
            f'tokenizer = load_processing_class("{base_ref}")',
            f'model = PeftModel.from_pretrained(base, "{repo}").merge_and_unload().eval()',
        ]
    else:
        body = [
            f'model = load_flow_model("{repo}").eval()',
            f'tokenizer = load_processing_class("{repo}")',
        ]
    sample = (
        f"canvas, outputs = generate(model, [{prompt!r}], tokenizer, "
        f"num_steps={args.num_flow_steps_eval},\n"
        f"                           cfg_scale={args.cfg_scale:g}, "
        f"time_power={args.flow_time_power:g}, seed=0)"
    )
    return "\n".join([*load, "", *body, sample, "outputs[0]  # a PIL image (image canvas) or a string"])


def flow_model_card(
    trainer: Any,
    model_name: str | None = None,
    dataset_name: str | None = None,
    tags: list[str] | None = None,
    weights_path: str | None = None,
) -> ModelCard:
    """The card of ``trainer``'s current policy (a PEFT adapter or a full model), whose quick start
    loads the weights from ``weights_path`` (default: the Hub id, else ``output_dir``)."""
    model = trainer.model
    is_adapter = hasattr(model, "peft_config")
    flow_model = model.get_base_model() if is_adapter else model
    hub_id, shown = base_model_of(flow_model)
    args = trainer.args
    model_name = model_name or os.path.basename(os.path.normpath(args.output_dir))
    repo = weights_path or trainer.hub_model_id or args.output_dir
    base_ref = hub_id or getattr(flow_model.config, "_name_or_path", "") or "PATH/TO/BASE/MODEL"
    peft_config = next(iter(model.peft_config.values())) if is_adapter else None
    card_data = ModelCardData(
        base_model=hub_id,
        datasets=[dataset_name] if dataset_name and "/" in dataset_name else None,
        library_name="peft" if is_adapter else "transformers",
        model_name=model_name,
        tags=sorted({"dflow-grpo", "discrete-flow-model", "trl", *(tags or [])}),
    )
    rows = _flow_settings(args, flow_model.get_probability_path(), peft_config)
    settings = "\n".join(f"| {k} | {v} |" for k, v in rows)
    what = "a LoRA adapter for" if is_adapter else "a fine-tuned version of"
    data = f" on `{dataset_name}`" if dataset_name else ""
    text = f"""---
{card_data.to_yaml()}
---

# {model_name}

This is {what} {shown} (`{type(flow_model).__name__}`, a discrete flow model), trained{data} with
**dFlowGRPO** ([arXiv 2605.09291](https://huggingface.co/papers/2605.09291)): GRPO over the
denoising trajectory, whose per-step policy is the flow's transition probability. It was trained
with dflow-trl, a [TRL](https://github.com/huggingface/trl) extension.

## Quick start

Sample with the settings the policy was trained for (the Euler steps, the time grid and the CFG
scale are part of the policy):

```python
{_quick_start(base_ref, is_adapter, args, repo, _example_prompt(trainer.train_dataset))}
```

## Flow settings

| setting | value |
|---|---|
{settings}

## Framework versions

dflow-trl {_version("dflow-trl")}, TRL {_version("trl")}, Transformers {_version("transformers")},
PEFT {_version("peft")}, PyTorch {_version("torch")}, Datasets {_version("datasets")}.

## Citation

```bibtex
{trainer._paper["citation"]}
```
"""
    return ModelCard(text)
