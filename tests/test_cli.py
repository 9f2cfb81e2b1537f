"""The ``dflow-trl`` CLI: a YAML recipe trains end to end; bad arguments fail clearly."""

from __future__ import annotations

import json
import os

import pytest

from dflow_trl.cli import load_prompt_dataset, main, resolve_model_path
from dflow_trl.tasks.shapeworld.pretrained import SHAPEWORLD_DIR, SHAPEWORLD_UNDERSTANDING_DIR

from .tiny import tiny_recipe

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def test_train_from_yaml_recipe_with_overrides(tmp_path):
    recipe = tiny_recipe(tmp_path)
    assert main(["train", "--config", str(recipe), "--learning_rate", "0.02", "--beta", "0.05"]) == 0
    out = tmp_path / "out"
    assert (out / "adapter_model.safetensors").is_file()
    card = (out / "README.md").read_text()
    assert "dflow-grpo" in card and "2605.09291" in card
    args = json.loads((out / "adapter_config.json").read_text())
    assert args["r"] == 4


def test_unknown_dataset_and_command_fail_clearly(tmp_path):
    with pytest.raises(ValueError, match="nothing is downloaded"):
        load_prompt_dataset("someone/some-hub-dataset", "train")
    assert main(["fly"]) == 2
    assert main(["--help"]) == 0


def test_shipped_cpu_recipe_runs(tmp_path):
    """recipes/shapeworld_t2i_cpu.yaml trains the shipped model (2 steps here, to keep the suite fast)."""
    recipe = os.path.join(os.path.dirname(__file__), "..", "recipes", "shapeworld_t2i_cpu.yaml")
    assert main(["train", "--config", recipe, "--max_steps", "2", "--output_dir", str(tmp_path / "out")]) == 0
    assert (tmp_path / "out" / "adapter_model.safetensors").is_file()


def test_a_single_lora_target_module_given_as_a_yaml_string_trains(tmp_path):
    """``lora_target_modules: q_proj`` is a string in YAML; PEFT alone would read it as a full-name regex
    and find no module."""
    recipe = tiny_recipe(tmp_path)
    recipe.write_text(
        recipe.read_text().replace("lora_target_modules: [q_proj, v_proj]", "lora_target_modules: q_proj")
    )
    assert main(["train", "--config", str(recipe)]) == 0
    args = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert args["target_modules"] == ["q_proj"]


def test_help_starts_without_importing_the_training_stack():
    """``dflow-trl --help`` used to import TRL, PEFT and bitsandbytes (seconds, and a warning)."""
    import subprocess
    import sys

    code = (
        "import sys; from dflow_trl.cli import main; main(['--help']); "
        "heavy = [m for m in ('trl', 'peft', 'bitsandbytes', 'transformers') if m in sys.modules]; "
        "print('HEAVY', heavy)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "usage: dflow-trl" in out
    assert "HEAVY []" in out


def test_train_help_leads_with_the_flow_options_and_marks_unused_ones(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    out = capsys.readouterr().out
    assert out.startswith("usage: dflow-trl train --config RECIPE.yaml")
    flow, rest = out.index("discrete-flow and recipe options:"), out.index("\noptions:")
    assert flow < out.index("--num_flow_steps") < rest
    assert out.index("--learning_rate") > rest
    temperature = out[out.index("--temperature") :]
    assert "[not used]" in temperature[: temperature.index("\n  --")]


def test_builtin_model_resolves_to_the_shipped_weights_of_the_task(tmp_path):
    assert resolve_model_path("shapeworld") == resolve_model_path(None, "t2i") == str(SHAPEWORLD_DIR)
    assert resolve_model_path("shapeworld", "understanding") == str(SHAPEWORLD_UNDERSTANDING_DIR)
    assert resolve_model_path(str(tmp_path), "understanding") == str(tmp_path)
    with pytest.raises(ValueError, match="local folder"):
        resolve_model_path(str(tmp_path / "missing"))
