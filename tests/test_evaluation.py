"""Evaluation helpers on a tiny random ShapeWorld-shaped model (well-formed output, input checks)."""

from __future__ import annotations

import math

import pytest
import torch

from dflow_trl.models import DFMTransformer, DFMTransformerConfig
from dflow_trl.tasks.shapeworld import (
    ANSWER_LENGTH,
    GRID,
    MAX_TEXT_LENGTH,
    QTYPES,
    TAGS,
    build_shapeworld_tokenizer,
    make_t2i_dataset,
    make_vqa_dataset,
    palette_embeddings,
)
from dflow_trl.tasks.shapeworld.evaluation import (
    balanced_t2i_eval_set,
    evaluate_t2i,
    evaluate_vqa,
    standard_error,
    stratified_standard_error,
)


@pytest.fixture(scope="module")
def tokenizer():
    return build_shapeworld_tokenizer()


@pytest.fixture(scope="module")
def model(tokenizer):
    torch.manual_seed(0)
    cfg = DFMTransformerConfig(
        text_vocab_size=len(tokenizer),
        image_vocab_size=9,
        image_shape=(GRID, GRID),
        text_canvas_length=ANSWER_LENGTH,
        max_prompt_length=MAX_TEXT_LENGTH,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        image_path={"type": "metric", "c": 3.0, "a": 0.9, "embeddings": palette_embeddings().tolist()},
        text_path={"type": "mask"},
        pad_token_id=tokenizer.pad_token_id,
        sep_token_id=tokenizer.sep_token_id,
        uncond_token_id=tokenizer.convert_tokens_to_ids("<uncond>"),
        mask_token_id=tokenizer.mask_token_id,
    )
    return DFMTransformer(cfg).eval()


def test_balanced_set_has_equal_categories():
    ds = balanced_t2i_eval_set("test", per_tag=7, seed=1)
    assert len(ds) == 7 * len(TAGS)
    assert all(ds["tag"].count(t) == 7 for t in TAGS)
    # Deterministic for a seed; prompts come from the asked split only.
    assert ds["prompt"] == balanced_t2i_eval_set("test", per_tag=7, seed=1)["prompt"]
    assert set(ds["prompt"]) <= set(make_t2i_dataset("test")["prompt"])
    with pytest.raises(ValueError, match="per_tag"):
        balanced_t2i_eval_set(per_tag=0)


def test_evaluate_t2i_is_well_formed_and_restores_task(model, tokenizer):
    ds = balanced_t2i_eval_set("test", per_tag=2)
    model.set_task("understanding")
    out = evaluate_t2i(model, tokenizer, ds, num_steps=3, seeds=(0, 1), batch_size=5, cfg_scale=1.0)
    assert model.task == "understanding"
    assert out["n"] == len(ds)
    assert set(out["per_category"]) == set(out["per_category_partial"]) == set(TAGS)
    for key in ("strict", "partial", "geneval"):
        assert 0.0 <= out[key] <= 1.0
    assert out["strict"] <= out["partial"]
    again = evaluate_t2i(model, tokenizer, ds, num_steps=3, seeds=(0, 1), batch_size=5, cfg_scale=1.0)
    assert again == out  # seeded


def test_evaluate_vqa_is_well_formed(model, tokenizer):
    ds = make_vqa_dataset("test", n=12)
    model.set_task("t2i")
    out = evaluate_vqa(model, tokenizer, ds, num_steps=2, batch_size=5)
    assert model.task == "t2i"
    assert out["n"] == 12 and 0.0 <= out["accuracy"] <= 1.0
    assert set(out["per_qtype"]) <= set(QTYPES) and out["per_qtype"]


def test_evaluation_rejects_bad_input(model, tokenizer):
    ds = balanced_t2i_eval_set("test", per_tag=1)
    with pytest.raises(ValueError, match="column"):
        evaluate_t2i(model, tokenizer, ds.remove_columns("metadata"))
    with pytest.raises(ValueError, match="num_steps"):
        evaluate_t2i(model, tokenizer, ds, num_steps=0)
    with pytest.raises(ValueError, match="seed"):
        evaluate_t2i(model, tokenizer, ds, seeds=())
    with pytest.raises(ValueError, match="empty"):
        evaluate_vqa(model, tokenizer, make_vqa_dataset("test", n=4).select([]))


def test_stratified_standard_error_matches_the_spread_of_resampled_means():
    """Redraw every category's values with the categories' sizes fixed: the spread of the overall
    mean is the stratified SE, and the pooled SE (which counts the gap between categories) is
    larger by a wide margin."""
    rng = torch.Generator().manual_seed(0)
    probs, sizes = [0.98, 0.5, 0.02], [20, 20, 20]
    strata = [c for c, n in enumerate(sizes) for _ in range(n)]

    def draw() -> list[float]:
        return [float(torch.rand((), generator=rng) < probs[c]) for c in strata]

    means = torch.tensor([sum(v) / len(v) for v in (draw() for _ in range(4000))])
    values = draw()
    strat = stratified_standard_error(values, [str(c) for c in strata])
    truth = sum((n / 60) ** 2 * p * (1 - p) / n for p, n in zip(probs, sizes)) ** 0.5
    assert means.std().item() == pytest.approx(truth, rel=0.06)
    assert strat == pytest.approx(truth, rel=0.35)
    assert standard_error(values) > 1.3 * truth
    # One stratum is the plain standard error; one value per stratum adds nothing.
    assert stratified_standard_error(values, ["a"] * 60) == pytest.approx(standard_error(values))
    # One value per stratum says nothing about the spread: unknown, not zero.
    assert math.isnan(stratified_standard_error([0.0, 1.0], ["a", "b"]))
    assert math.isnan(standard_error([1.0]))
    with pytest.raises(ValueError, match="strata"):
        stratified_standard_error([1.0], [])


def test_a_lora_model_is_sampled_merged_and_left_unmerged(model, tokenizer):
    """Evaluation merges a LoRA adapter into the base weights while sampling (faster, same samples)
    and unmerges it after: the scores equal those of the unmerged model's samples, and the weights
    are as before."""
    import copy
    from contextlib import nullcontext

    from peft import LoraConfig, get_peft_model

    import dflow_trl.tasks.shapeworld.evaluation as evaluation

    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    peft = get_peft_model(copy.deepcopy(model), lora)
    for name, p in peft.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.5)  # a trained-looking adapter, not the zero init
    before = {k: v.clone() for k, v in peft.state_dict().items()}
    ds = balanced_t2i_eval_set("test", per_tag=2)
    merged = evaluate_t2i(peft, tokenizer, ds, num_steps=3, seeds=(0, 1), batch_size=6, return_samples=True)
    assert all(torch.equal(v, peft.state_dict()[k]) for k, v in before.items())
    assert not any(getattr(m, "merged", False) for m in peft.modules())
    original = evaluation._merged_adapter
    evaluation._merged_adapter = lambda m: nullcontext()
    try:
        unmerged = evaluate_t2i(
            peft, tokenizer, ds, num_steps=3, seeds=(0, 1), batch_size=6, return_samples=True
        )
    finally:
        evaluation._merged_adapter = original
    assert merged["samples"] == unmerged["samples"]
    base = evaluate_t2i(model, tokenizer, ds, num_steps=3, seeds=(0, 1), batch_size=6, return_samples=True)
    assert base["samples"] != merged["samples"]  # the adapter changes what is sampled
