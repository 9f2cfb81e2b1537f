"""The shipped ShapeWorld DFM: loads offline, has the documented paths, and is a real (trained) model."""

from __future__ import annotations

import shutil

import pytest
import torch

from dflow_trl.models import DFMTransformer
from dflow_trl.paths import MetricInducedPath, MixturePath
from dflow_trl.rollout import generate
from dflow_trl.tasks.shapeworld import ANSWER_LENGTH, GRID, PALETTE_SIZE, make_vqa_dataset, palette_embeddings
from dflow_trl.tasks.shapeworld.evaluation import balanced_t2i_eval_set, evaluate_t2i, evaluate_vqa
from dflow_trl.tasks.shapeworld.pretrained import (
    SHAPEWORLD_DIR,
    SHAPEWORLD_UNDERSTANDING_DIR,
    load_shapeworld_model,
)

# The shipped weights draw every held-out single-object prompt correctly (strict 1.0 at 12 steps,
# seed 0; an untrained model scores 0) and answer ~0.32 of held-out questions at 4 steps (an
# untrained model ~0: it must first learn which of 50 tokens are answers; see docs/shapeworld.md).
SINGLE_OBJECT_MIN_STRICT = 0.6
VQA_MIN_ACCURACY = 0.2


@pytest.fixture(scope="module")
def shipped():
    return load_shapeworld_model()


def test_asset_is_small_and_complete():
    total = 0
    for folder in (SHAPEWORLD_DIR, SHAPEWORLD_UNDERSTANDING_DIR):
        assert (folder / "model.safetensors").is_file() and (folder / "tokenizer.json").is_file()
        total += sum(f.stat().st_size for f in folder.iterdir() if f.is_file())
    assert total <= 15 * 2**20


def test_understanding_stage_is_the_base_trained_further_with_the_same_tokenizer(shipped):
    base, tok = shipped
    stage, stage_tok = load_shapeworld_model("understanding")
    assert stage.task == "understanding" and stage_tok.get_vocab() == tok.get_vocab()
    base_sd, stage_sd = base.state_dict(), stage.state_dict()
    assert base_sd.keys() == stage_sd.keys()
    assert any(not torch.equal(base_sd[k], stage_sd[k]) for k in base_sd)
    # An explicit path still wins over the task's default folder.
    explicit = load_shapeworld_model("understanding", path=SHAPEWORLD_DIR)[0].state_dict()
    assert all(torch.equal(explicit[k], base_sd[k]) for k in base_sd)


def test_loads_offline_with_documented_paths(shipped, monkeypatch):
    model, tok = shipped
    assert isinstance(model, DFMTransformer) and model.task == "t2i" and not model.training
    cfg = model.config
    assert cfg.image_shape == [GRID, GRID] and cfg.image_vocab_size == PALETTE_SIZE
    assert cfg.text_vocab_size == len(tok) and cfg.text_canvas_length == ANSWER_LENGTH
    assert cfg.image_path["type"] == "metric" and cfg.text_path["type"] == "mask"
    assert torch.allclose(torch.tensor(cfg.image_path["embeddings"]), palette_embeddings())
    assert isinstance(model.get_probability_path(), MetricInducedPath)
    assert (cfg.pad_token_id, cfg.mask_token_id) == (tok.pad_token_id, tok.mask_token_id)
    assert (
        cfg.uncond_token_id == tok.convert_tokens_to_ids("<uncond>") and cfg.sep_token_id == tok.sep_token_id
    )
    # Nothing may reach a hub: loading again with the network forced off still works.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    understanding, _ = load_shapeworld_model("understanding")
    assert understanding.task == "understanding"
    path = understanding.get_probability_path()
    assert isinstance(path, MixturePath) and path.source == "mask"


def test_custom_dir_and_bad_input(tmp_path):
    shutil.copytree(SHAPEWORLD_DIR, tmp_path / "copy")
    model, _ = load_shapeworld_model(path=tmp_path / "copy")
    assert model.task == "t2i"
    with pytest.raises(ValueError, match="lacks"):
        load_shapeworld_model(path=tmp_path)
    with pytest.raises(ValueError, match="task"):
        load_shapeworld_model("vqa")


def test_generate_returns_grids(shipped):
    model, tok = shipped
    prompts = [
        "a photo of a square", "a photo of two circles", "a photo of a red cross", "a photo of a diamond"
    ]
    canvas, images = generate(model, prompts, tok, num_steps=8, seed=0)
    assert canvas.shape == (4, GRID * GRID)
    assert int(canvas.min()) >= 0 and int(canvas.max()) < PALETTE_SIZE
    assert [im.size for im in images] == [(GRID, GRID)] * 4


def test_base_is_trained(shipped):
    model, tok = shipped
    single = balanced_t2i_eval_set("test", per_tag=10).filter(lambda r: r["tag"] == "single_object")
    assert evaluate_t2i(model, tok, single, num_steps=12)["strict"] >= SINGLE_OBJECT_MIN_STRICT
    out = evaluate_vqa(model, tok, make_vqa_dataset("test", n=200), num_steps=4)
    assert out["accuracy"] > VQA_MIN_ACCURACY
    assert model.task == "t2i"
