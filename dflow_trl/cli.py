"""``dflow-trl`` command line: ``train`` (TrlParser + YAML recipes), ``demo`` and ``reward-server``.

    dflow-trl train --config recipes/shapeworld_t2i_cpu.yaml [--learning_rate 1e-4 ...]
    accelerate launch -m dflow_trl.cli train --config recipe.yaml
    dflow-trl demo [--output-dir DIR] [--task t2i|understanding]
    dflow-trl reward-server --reward pickscore --port 8000
"""

from __future__ import annotations

import os
import re
import sys
from dataclasses import dataclass, field
from typing import Any

BUILTIN_DATASETS = ("shapeworld-t2i", "shapeworld-vqa")
BUILTIN_MODELS = ("shapeworld",)


@dataclass
class DFlowScriptArguments:
    """Script arguments of ``dflow-trl train`` (the model comes from ``ModelConfig.model_name_or_path``).

    ``dataset_name`` is a built-in task (``shapeworld-t2i``, ``shapeworld-vqa``), a folder saved with
    ``Dataset.save_to_disk``, or a local ``.json``/``.jsonl``/``.csv``/``.parquet`` file; it needs a
    ``prompt`` column. ``model_name_or_path`` may be ``shapeworld`` (the shipped model) or a local folder.
    """

    dataset_name: str = field(
        default="shapeworld-t2i", metadata={"help": "Built-in task, saved dataset or data file."}
    )
    dataset_train_split: str = field(default="train", metadata={"help": "Split to train on."})
    dataset_test_split: str = field(default="test", metadata={"help": "Split to evaluate on."})
    reward_funcs: list[str] = field(
        default_factory=lambda: ["shapeworld_partial"],
        metadata={"help": "Reward functions: registry names (see dflow_trl.rewards) or dotted import paths."},
    )
    task: str | None = field(default=None, metadata={"help": "Model task: 't2i' or 'understanding'."})
    max_train_samples: int | None = field(default=None, metadata={"help": "Truncate the training set."})
    push_adapter_to_hub: bool = field(
        default=False, metadata={"help": "Push the result with trainer.push_to_hub()."}
    )


TRAIN_USAGE = "dflow-trl train --config RECIPE.yaml [--FIELD VALUE ...]"
TRAIN_DESCRIPTION = (
    "Train a discrete flow model with dFlowGRPO. A YAML recipe (--config) sets any field below; a "
    "flag overrides it. The discrete-flow and recipe options come first; TrainingArguments, "
    "GRPOConfig and ModelConfig follow. Options marked [not used] are refused or ignored: a rollout "
    "is a denoising trajectory, not autoregressive decoding (docs/trainer.md has the table)."
)


def make_parser() -> Any:
    """TRL's parser over the recipe, ``DFlowGRPOConfig`` and ``ModelConfig`` fields, its help led by
    the flow options and with the decoding / vLLM options marked as not used."""
    import dataclasses

    from trl import GRPOConfig, ModelConfig, TrlParser

    from .trainer import DFlowGRPOConfig
    from .trainer.config import _DECODING_FIELDS

    parser = TrlParser((DFlowScriptArguments, DFlowGRPOConfig, ModelConfig))
    parser.prog, parser.usage, parser.description = "dflow-trl train", TRAIN_USAGE, TRAIN_DESCRIPTION
    trl_fields = {f.name for f in dataclasses.fields(GRPOConfig)}
    flow = {f.name for f in dataclasses.fields(DFlowGRPOConfig)} - trl_fields
    flow |= {f.name for f in dataclasses.fields(DFlowScriptArguments)}
    unused = {name for name, _, _ in _DECODING_FIELDS} | {"use_vllm", "mask_truncated_completions"}
    group = parser.add_argument_group("discrete-flow and recipe options")
    options = parser._action_groups[1]
    for action in list(options._group_actions):
        if action.dest in flow:
            options._group_actions.remove(action)
            group._group_actions.append(action)
        elif action.dest in unused or action.dest.startswith("vllm_"):
            action.help = "[not used] " + (action.help or "")
    parser._action_groups.remove(group)
    parser._action_groups.insert(1, group)
    return parser


def load_prompt_dataset(name: str, split: str) -> Any:
    """A prompt dataset by built-in name, saved folder or local data file (never from a hub)."""
    from datasets import Dataset, DatasetDict, load_dataset, load_from_disk

    if name == "shapeworld-t2i":
        from .tasks.shapeworld import make_t2i_dataset

        return make_t2i_dataset(split)
    if name == "shapeworld-vqa":
        from .tasks.shapeworld import make_vqa_dataset

        return make_vqa_dataset(split)
    if os.path.isdir(name):
        ds = load_from_disk(name)
        return ds[split] if isinstance(ds, DatasetDict) else ds
    ext = os.path.splitext(name)[1].lstrip(".")
    if os.path.isfile(name) and ext in ("json", "jsonl", "csv", "parquet"):
        ds = load_dataset("json" if ext == "jsonl" else ext, data_files={split: name}, split=split)
        assert isinstance(ds, Dataset)
        return ds
    raise ValueError(
        f"dataset {name!r} not found: use one of {', '.join(BUILTIN_DATASETS)}, a folder written by "
        "Dataset.save_to_disk, or a local .json/.jsonl/.csv/.parquet file (nothing is downloaded)"
    )


def resolve_model_path(name: str | None, task: str | None = None) -> str:
    """The folder of ``name``: the shipped ShapeWorld model for a built-in name (its understanding
    stage when ``task`` is ``"understanding"``), else a local folder."""
    if name in (None, "", *BUILTIN_MODELS):
        from .tasks.shapeworld.pretrained import shipped_dir

        return str(shipped_dir(task))
    if not os.path.isdir(name):
        raise ValueError(f"model {name!r} is not a local folder; models are never downloaded here")
    return name


def _module_list(targets: Any) -> Any:
    """``lora_target_modules: q_proj`` in a YAML recipe is a string, which PEFT reads as a regex that
    must match a module's *full* name, so it finds nothing; a plain module name becomes ``[name]``.
    ``all-linear`` and strings with regex syntax are left to PEFT."""
    if isinstance(targets, str) and targets != "all-linear" and re.fullmatch(r"[\w\-]+", targets):
        return [targets]
    return targets


def train(argv: list[str] | None = None) -> int:
    """``dflow-trl train``: the GRPO script of TRL, for discrete flow models."""
    from trl import get_peft_config, get_quantization_config

    from .models import load_flow_model, load_processing_class
    from .rewards import get_reward_function
    from .trainer import DFlowGRPOTrainer

    script_args, training_args, model_args = make_parser().parse_args_and_config(args=argv)
    model_args.lora_target_modules = _module_list(model_args.lora_target_modules)
    path = resolve_model_path(model_args.model_name_or_path, script_args.task)
    kwargs: dict[str, Any] = dict(training_args.model_init_kwargs or {})
    if model_args.dtype not in (None, "auto", "float32"):
        import torch

        kwargs.setdefault("dtype", getattr(torch, model_args.dtype))
    if model_args.attn_implementation:
        kwargs["attn_implementation"] = model_args.attn_implementation
    if script_args.task:
        kwargs["task"] = script_args.task
    model = load_flow_model(path, quantization_config=get_quantization_config(model_args), **kwargs)
    training_args.model_init_kwargs = None  # consumed above; TRL would warn that they are ignored
    tokenizer = load_processing_class(path)
    train_ds = load_prompt_dataset(script_args.dataset_name, script_args.dataset_train_split)
    if script_args.max_train_samples:
        train_ds = train_ds.select(range(min(script_args.max_train_samples, len(train_ds))))
    eval_ds = None
    if training_args.eval_strategy != "no":
        eval_ds = load_prompt_dataset(script_args.dataset_name, script_args.dataset_test_split)
    rewards = [get_reward_function(spec) for spec in script_args.reward_funcs]
    trainer = DFlowGRPOTrainer(
        model=model,
        reward_funcs=rewards,
        args=training_args,
        train_dataset=train_ds,
        eval_dataset=eval_ds,
        processing_class=tokenizer,
        peft_config=get_peft_config(model_args),
    )
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    trainer.save_model(training_args.output_dir)
    trainer.create_model_card(dataset_name=script_args.dataset_name)
    if training_args.push_to_hub or script_args.push_adapter_to_hub:
        trainer.push_to_hub(dataset_name=script_args.dataset_name)
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    usage = "usage: dflow-trl {train,demo,reward-server} [options]  (dflow-trl COMMAND --help for details)"
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__.strip() + "\n\n" + usage)
        return 0
    command, rest = argv[0], argv[1:]
    if command == "train":
        return train(rest)
    if command == "demo":
        from .tasks.shapeworld.demo import main as demo_main

        return demo_main(rest)
    if command == "reward-server":
        from .rewards.server import main as server_main

        return server_main(rest)
    print(f"dflow-trl: unknown command {command!r}\n{usage}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
