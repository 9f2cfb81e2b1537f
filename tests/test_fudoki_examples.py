"""The FUDOKI examples run on a tiny checkpoint, and the recipes use the trainer's field names."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from .fudoki_fixtures import TINY, write_tiny_fudoki_checkpoint

EXAMPLES = Path(__file__).resolve().parent.parent / "examples" / "fudoki"


def _module(name: str):
    spec = importlib.util.spec_from_file_location(f"fudoki_example_{name}", EXAMPLES / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_fudoki_checkpoint(tmp_path_factory.mktemp("fudoki_ex") / "ckpt")


def test_sampling_script_writes_an_image_grid_with_and_without_an_adapter(tmp_path: Path, ckpt: Path) -> None:
    from peft import LoraConfig, get_peft_model
    from PIL import Image

    from dflow_trl.models.fudoki import FudokiForFlow

    sample = _module("sample")
    common = ["--model", str(ckpt), "--steps", "3", "--dtype", "float32", "--device", "cpu"]
    prompts = ["--prompts", "a red cat", "a blue dog", "--images-per-prompt", "3"]
    images = sample.main([*common, *prompts, "--out", str(tmp_path / "grid.png")])
    side = TINY["image_size"] // TINY["patch"] * 2 ** (len(TINY["vq_mult"]) - 1)
    assert len(images) == 6 and images[0].size == (side, side)
    assert Image.open(tmp_path / "grid.png").size == (3 * (side + 2) + 2, 2 * (side + 2) + 2)

    lora = LoraConfig(
        r=2, lora_alpha=4, target_modules=FudokiForFlow.lora_target_modules, init_lora_weights=False
    )
    get_peft_model(FudokiForFlow.from_pretrained(ckpt), lora).save_pretrained(tmp_path / "adapter")
    adapted = sample.main(
        [*common, *prompts, "--adapter", str(tmp_path / "adapter"), "--out", str(tmp_path / "a.png")]
    )
    assert len(adapted) == 6


def test_sampling_script_answers_questions_about_an_image(tmp_path: Path, ckpt: Path) -> None:
    from PIL import Image

    Image.fromarray(np.full((30, 50, 3), 200, dtype=np.uint8)).save(tmp_path / "photo.png")
    sample = _module("sample")
    args = ["--model", str(ckpt), "--task", "understanding", "--image", str(tmp_path / "photo.png")]
    args += ["--prompts", "What is it?", "--steps", "2", "--dtype", "float32", "--device", "cpu"]
    answers = sample.main([*args, "--out", str(tmp_path / "answers.txt")])
    assert len(answers) == 1 and isinstance(answers[0], str)
    assert (tmp_path / "answers.txt").read_text(encoding="utf-8").startswith("Q: What is it?")


def test_prepare_data_writes_the_columns_the_rewards_read(tmp_path: Path) -> None:
    prep = _module("prepare_data")
    (tmp_path / "train.txt").write_text("a cat\n\na dog\n", encoding="utf-8")
    prep.main(["pickscore", "--train", str(tmp_path / "train.txt"), "--out", str(tmp_path / "ps")])
    assert [json.loads(x) for x in (tmp_path / "ps" / "train.jsonl").read_text().splitlines()] == [
        {"prompt": "a cat"},
        {"prompt": "a dog"},
    ]
    root = tmp_path / "sqa"
    (root / "data" / "scienceqa").mkdir(parents=True)
    (root / "train" / "7").mkdir(parents=True)
    (root / "train" / "7" / "image.png").write_bytes(b"png")
    problems = {
        "7": {
            "split": "train",
            "question": "Which is a mammal?",
            "choices": ["cat", "fish"],
            "answer": 0,
            "image": "image.png",
        },
        "8": {"split": "train", "question": "No image?", "choices": ["a", "b"], "answer": 1, "image": None},
    }
    (root / "data" / "scienceqa" / "problems.json").write_text(json.dumps(problems), encoding="utf-8")
    prep.main(["scienceqa", "--root", str(root), "--out", str(tmp_path / "sq")])
    rows = [json.loads(x) for x in (tmp_path / "sq" / "train.jsonl").read_text().splitlines()]
    assert len(rows) == 1 and rows[0]["answer"] == "A" and rows[0]["choices"] == ["cat", "fish"]
    assert rows[0]["input_image"].endswith("image.png") and "A. cat\nB. fish" in rows[0]["prompt"]


@pytest.mark.parametrize("recipe", ["t2i_pickscore", "t2i_geneval", "understanding_scienceqa"])
def test_recipes_use_known_fields_and_the_papers_settings(recipe: str) -> None:
    from trl import ModelConfig, ScriptArguments

    from dflow_trl.trainer.config import DFlowGRPOConfig

    known = {
        f.name for cls in (DFlowGRPOConfig, ModelConfig, ScriptArguments) for f in dataclasses.fields(cls)
    }
    cfg = yaml.safe_load((EXAMPLES / f"{recipe}.yaml").read_text(encoding="utf-8"))
    assert set(cfg) - known - {"reward_funcs"} == set()
    assert cfg["num_generations"] == 24 and cfg["num_flow_steps"] == 8 and cfg["num_flow_steps_eval"] == 20
    assert (cfg["epsilon"], cfg["epsilon_high"]) == (1e-3, 1.5e-3)
    assert (cfg["lora_r"], cfg["lora_alpha"]) == (48, 96)
    # The one deliberate departure: the paper trains steps 0..K-2 only, a biased gradient
    # (tests/test_gradient_unbiased.py); the recipes train the last step too.
    assert cfg["include_last_step"] is True
    understanding = recipe.startswith("understanding")
    assert cfg["model_init_kwargs"]["task"] == ("understanding" if understanding else "t2i")
    assert cfg["beta"] == (0.01 if understanding else 0.0)
    if not understanding:
        assert cfg["num_mc_samples"] == 24 and cfg["learning_rate"] == 1e-5
    for acc in ("ddp", "deepspeed_zero2", "fsdp"):
        assert (
            yaml.safe_load((EXAMPLES / "accelerate" / f"{acc}.yaml").read_text())["mixed_precision"] == "bf16"
        )
