"""``dflow-trl demo`` end to end at toy size, and how it picks the picture's prompts."""

from __future__ import annotations

import json
import math

import pytest
from PIL import Image

from dflow_trl.tasks.shapeworld import score_t2i
from dflow_trl.tasks.shapeworld.demo import _nan_to_null, _with_se, build_parser, picture_columns, run


def test_picture_shows_the_first_prompts_of_each_category_whatever_their_scores():
    tags = ["a", "a", "a", "b", "b"]
    assert picture_columns(tags) == [0, 3]
    assert picture_columns(tags, per_tag=2) == [0, 1, 3, 4]


def test_an_unknown_standard_error_reads_as_unknown_not_as_zero():
    # One prompt per category (--eval-per-tag 1) leaves no spread to estimate the error from.
    assert _with_se(0.5, math.nan) == "0.500 ± n/a" and _with_se(0.5, 0.0191) == "0.500 ± 0.019"
    cleaned = _nan_to_null({"se": math.nan, "base": {"per": [1.0, math.nan]}, "n": 3})
    assert cleaned == {"se": None, "base": {"per": [1.0, None]}, "n": 3}
    json.dumps(cleaned, allow_nan=False)


def test_demo_writes_results_picture_and_adapter(tmp_path):
    args = build_parser().parse_args([
        "--output-dir", str(tmp_path), "--max-steps", "1", "--eval-per-tag", "2", "--eval-steps", "2",
        "--eval-samples", "2",
    ])  # fmt: skip
    res = run(args)
    saved = json.loads((tmp_path / "results.json").read_text())
    keys = {"base_score", "final_score", "base_se", "final_se", "improvement_se", "samples_per_prompt"}
    assert keys | {"wall_seconds", "steps", "config"} <= saved.keys()
    assert saved["samples_per_prompt"] == 2 and saved["base_se"] == saved["base"]["strict_se"] >= 0
    assert saved["steps"] == 1 and saved["config"]["max_steps"] == 1
    assert (
        set(saved["base"]["per_category"]) == set(saved["final"]["per_category"])
        and len(saved["base"]["per_category"]) == 6
    )
    assert "samples" not in saved["base"] and "samples" not in res["final"]  # grids stay out of the JSON
    assert saved["base_score"] == pytest.approx(sum(saved["base"]["per_prompt"]) / 12)
    # samples.jsonl: every scored sample, before and after, rescored to the same strict scores.
    lines = [json.loads(line) for line in (tmp_path / "samples.jsonl").read_text().splitlines()]
    assert len(lines) == 12 * 2 and len({line["seed"] for line in lines}) == 2
    for line in lines:
        assert {"prompt", "metadata", "seed", "base_grid", "final_grid"} <= line.keys()
        assert len(line["base_grid"]) == 16 and all(len(r) == 16 for r in line["final_grid"])
        assert score_t2i(line["base_grid"], line["metadata"])[0] == line["base_strict"]
        assert score_t2i(line["final_grid"], line["metadata"])[0] == line["final_strict"]
    per_prompt = [sum(line["base_strict"] for line in lines[2 * i : 2 * i + 2]) / 2 for i in range(12)]
    assert per_prompt == pytest.approx(saved["base"]["per_prompt"])
    picture = Image.open(tmp_path / "samples_before_after.png")
    assert picture.size[0] > 12 * 160 and picture.size[1] > 2 * 160  # 2 prompts × 6 categories, 2 rows
    assert (tmp_path / "reward_curve.png").is_file()
    assert (
        (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
        and (tmp_path / "adapter" / "README.md").is_file()
    )
    card = (tmp_path / "adapter" / "README.md").read_text()
    assert f'PeftModel.from_pretrained(base, "{tmp_path / "adapter"}")' in card and "shapeworld-t2i" in card
