"""``examples/shapeworld/pretrain.py`` end to end at toy size: it trains, checkpoints and saves a
model that the ShapeWorld loader reads back."""

from __future__ import annotations

import importlib.util
import json
import random
import sys
from pathlib import Path

import pytest

from dflow_trl.tasks.shapeworld.pretrained import load_shapeworld_model

SCRIPT = Path(__file__).resolve().parents[1] / "examples" / "shapeworld" / "pretrain.py"


def _load_script():
    spec = importlib.util.spec_from_file_location("shapeworld_pretrain", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_pretrain_trains_checkpoints_and_saves_a_loadable_model(tmp_path):
    script = _load_script()
    out = tmp_path / "model"
    summary = script.train(script.parse_args([
        "--output-dir", str(out), "--steps", "4", "--save-every", "2", "--log-every", "2",
        "--hidden", "32", "--layers", "1", "--heads", "2", "--intermediate", "64",
        "--batch-size", "3", "--vqa-batch-size", "2", "--vqa-pool", "16", "--t-power", "2",
    ]))
    assert summary["steps"] == 4 and len(summary["history"]) == 2
    assert all(row["loss_t2i"] > 0 and row["loss_vqa"] > 0 for row in summary["history"])
    assert (
        (out / "step-2" / "model.safetensors").is_file() and (out / "step-4" / "model.safetensors").is_file()
    )
    assert json.loads((out / "training_log.json").read_text())["args"]["t_power"] == 2
    model, _ = load_shapeworld_model("understanding", out)
    cfg = model.config
    assert (
        model.task == "understanding"
        and cfg.time_conditioning
        and cfg.condition_pooling == "ordered"
        and cfg.image_position_2d
    )


def test_pretrain_rejects_bad_arguments():
    script = _load_script()
    with pytest.raises(SystemExit):
        script.parse_args(["--output-dir", "x", "--steps", "3", "--minutes", "1"])
    with pytest.raises(SystemExit):
        script.parse_args(["--output-dir", "x", "--steps", "3", "--t-power", "0"])
    with pytest.raises(SystemExit):
        script.parse_args(["--output-dir", "x", "--steps", "3", "--caption-noise", "1.5"])
    with pytest.raises(SystemExit):
        script.parse_args(["--output-dir", "x", "--steps", "3", "--answer-noise", "-0.1"])


def test_vqa_source_answers_a_noisy_fraction_wrongly_and_replays_the_clean_sampler():
    from dflow_trl.tasks.shapeworld import build_shapeworld_tokenizer
    from dflow_trl.tasks.shapeworld.tokenizer import decode_answer

    script = _load_script()
    tok = build_shapeworld_tokenizer()
    clean = script.VQASource(random.Random(0), tok, 300, 0).batch(64)
    # The noise-free sampler draws the pool indices exactly as the shipped model's pretraining did.
    pool = script.make_vqa_dataset("train", n=300, seed=0, held_out="combinations")
    rng = random.Random(0)
    idx = [rng.randrange(300) for _ in range(64)]
    assert clean.prompts == [pool["prompt"][i] for i in idx]
    truth = {(p, tuple(s)): a for p, s, a in zip(pool["prompt"], pool["scene_tokens"], pool["answer"])}
    noisy = script.VQASource(random.Random(1), tok, 300, 0, answer_noise=0.5).batch(400)
    right = [
        decode_answer(x1.tolist(), tok) == truth[(p, tuple(s))]
        for p, s, x1 in zip(noisy.prompts, noisy.scenes, noisy.x1)
    ]
    assert 0.35 < 1 - sum(right) / len(right) < 0.65


def test_t2i_source_draws_both_sides_of_the_split_with_noisy_captions():
    import random

    from dflow_trl.tasks.shapeworld import all_prompts, score_t2i, t2i_split_of

    script = _load_script()
    metas = {m["prompt"]: m for m in all_prompts()}
    batch = script.T2ISource(random.Random(0), 0.25, caption_noise=0.4).batch(200)
    assert {t2i_split_of(metas[p]) for p in batch.prompts} == {"train", "test"}
    right = [score_t2i(g, metas[p])[0] for p, g in zip(batch.prompts, batch.x1)]
    assert 0.45 < sum(right) / len(right) < 0.85  # single objects are always right, the rest 60%
    clean = script.T2ISource(random.Random(0), 0.25, caption_noise=0.0).batch(50)
    assert all(score_t2i(g, metas[p])[0] == 1.0 for p, g in zip(clean.prompts, clean.x1))


def test_init_from_copies_shared_weights_and_leaves_new_routes_fresh(tmp_path):
    import torch

    script = _load_script()
    small = ["--hidden", "32", "--layers", "1", "--heads", "2", "--intermediate", "64",
             "--batch-size", "2", "--vqa-batch-size", "2", "--vqa-pool", "8"]  # fmt: skip
    script.train(
        script.parse_args(["--output-dir", str(tmp_path / "a"), "--steps", "1", "--pooling", "mean", *small])
    )
    args = script.parse_args(
        ["--output-dir", str(tmp_path / "b"), "--steps", "1", "--pooling", "encoder", *small]
    )
    tok = script.build_shapeworld_tokenizer()
    warm = script.DFMTransformer(script.build_config(tok, args))
    script.init_from(warm, tmp_path / "a")
    source, _ = load_shapeworld_model("t2i", tmp_path / "a")
    torch.testing.assert_close(warm.layers[0].mlp.up_proj.weight, source.layers[0].mlp.up_proj.weight)
    assert warm.condition_encoder.self_attn.o_proj.weight.abs().sum() == 0  # fresh: the identity
    # A model without a route the source has cannot take its weights silently.
    args = script.parse_args(
        ["--output-dir", str(tmp_path / "c"), "--steps", "1", "--pooling", "none", *small]
    )
    with pytest.raises(ValueError, match="has no"):
        script.init_from(script.DFMTransformer(script.build_config(tok, args)), tmp_path / "a")
    args = script.parse_args(
        ["--output-dir", str(tmp_path / "d"), "--steps", "1", *small[:-6], "--hidden", "16"]
    )
    with pytest.raises(ValueError, match="shapes differ"):
        script.init_from(script.DFMTransformer(script.build_config(tok, args)), tmp_path / "a")
