"""``dflow-trl demo`` end to end at toy size, and how it picks the picture's prompts."""

from __future__ import annotations

import json

from PIL import Image

from dflow_trl.demo import build_parser, picture_columns, run


def test_picture_shows_the_first_changed_prompt_of_each_category():
    tags = ["a", "a", "a", "b", "b"]
    assert picture_columns(tags, [0, 0, 1, 1, 0], [0, 1, 0, 1, 0]) == [1, 3]
    assert picture_columns(tags, [0] * 5, [0] * 5) == [0, 3]


def test_demo_writes_results_picture_and_adapter(tmp_path):
    args = build_parser().parse_args([
        "--output-dir", str(tmp_path), "--max-steps", "1", "--eval-per-tag", "1", "--eval-steps", "2",
    ])  # fmt: skip
    res = run(args)
    saved = json.loads((tmp_path / "results.json").read_text())
    assert {"base_score", "final_score", "wall_seconds", "steps", "config"} <= saved.keys()
    assert saved["steps"] == 1 and saved["config"]["max_steps"] == 1
    assert set(saved["base"]["per_category"]) == set(saved["final"]["per_category"]) and len(saved["base"]["per_category"]) == 6
    assert "samples" not in saved["base"] and "samples" not in res["final"]  # grids stay out of the JSON
    assert saved["base_score"] == sum(saved["base"]["per_prompt"]) / 6
    picture = Image.open(tmp_path / "samples_before_after.png")
    assert picture.size[0] > 6 * 160 and picture.size[1] > 2 * 160  # 6 categories, base and tuned rows
    assert (tmp_path / "reward_curve.png").is_file()
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file() and (tmp_path / "adapter" / "README.md").is_file()
