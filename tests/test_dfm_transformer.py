"""DFMTransformer's optional routes: the pooled condition and 2-D image positions."""

from __future__ import annotations

import pytest
import torch

from dflow_trl.models import DFMTransformer

from .tiny import tiny_model, tiny_tokenizer


def _pooled(model: DFMTransformer, prompts: list[str], canvas: torch.LongTensor, **columns) -> torch.Tensor:
    """The input of ``condition_proj`` (the pooled condition) for ``prompts`` with ``canvas``."""
    seen = []
    handle = model.condition_proj.register_forward_hook(lambda mod, args, out: seen.append(args[0].detach()))
    batch = model.prepare_flow_inputs(prompts, tiny_tokenizer(), **columns)
    model(batch.with_canvas(canvas), batch.attention_mask, canvas_mask=batch.canvas_mask)
    handle.remove()
    return seen[0]


def test_pooled_condition_reads_the_prompt_words_only():
    model = tiny_model("uniform", condition_pooling=True).eval()
    d = model.canvas_length
    zeros, ones = torch.zeros(1, d, dtype=torch.long), torch.ones(1, d, dtype=torch.long)
    red = _pooled(model, ["a red square"], zeros)
    torch.testing.assert_close(red, _pooled(model, ["a red square"], ones))  # canvas noise is not condition
    assert not torch.allclose(red, _pooled(model, ["a blue square"], zeros))
    # Order-free by design: binding has to come through attention.
    torch.testing.assert_close(red, _pooled(model, ["a square red"], zeros))


def test_pooled_condition_skips_the_condition_image_and_the_answer_canvas():
    model = tiny_model("uniform", task="understanding", condition_pooling=True).eval()
    n_img = model.config.image_canvas_length
    d = model.canvas_length
    col = model.config.image_column
    a = _pooled(model, ["red square"], torch.zeros(1, d, dtype=torch.long), **{col: [[0] * n_img]})
    b = _pooled(model, ["red square"], torch.full((1, d), 5, dtype=torch.long), **{col: [[1] * n_img]})
    torch.testing.assert_close(a, b)


def test_pooling_config_round_trips(tmp_path):
    model = tiny_model("uniform", condition_pooling=True).eval()
    model.save_pretrained(tmp_path)
    loaded = DFMTransformer.from_pretrained(tmp_path).eval()
    assert loaded.config.condition_pooling and loaded.condition_proj is not None
    batch = model.prepare_flow_inputs(["a red square"], tiny_tokenizer())
    ids = batch.with_canvas(torch.zeros(1, model.canvas_length, dtype=torch.long))
    torch.testing.assert_close(
        model(ids, batch.attention_mask, canvas_mask=batch.canvas_mask),
        loaded(ids, batch.attention_mask, canvas_mask=batch.canvas_mask),
    )
    assert tiny_model("uniform").condition_proj is None


def test_positional_pooling_reads_word_order():
    model = tiny_model("uniform", condition_pooling="positional").eval()
    zeros = torch.zeros(1, model.canvas_length, dtype=torch.long)
    red = _pooled(model, ["a red square"], zeros)
    assert not torch.allclose(red, _pooled(model, ["a square red"], zeros), atol=1e-4)
    torch.testing.assert_close(red, _pooled(model, ["a red square"], torch.ones_like(zeros)))
    # Positions count within the prompt: padding next to a longer prompt changes nothing.
    both = _pooled(model, ["a red square", "red"], torch.zeros(2, model.canvas_length, dtype=torch.long))
    torch.testing.assert_close(both[:1], red)
    torch.testing.assert_close(both[1:], _pooled(model, ["red"], zeros))


@pytest.mark.parametrize("task", ["t2i", "understanding"])
def test_encoder_pooling_reads_word_order_and_only_the_prompt(task):
    model = tiny_model("uniform", task=task, condition_pooling="encoder").eval()
    enc = model.condition_encoder
    for weight in (enc.self_attn.o_proj.weight, enc.mlp.down_proj.weight):
        torch.nn.init.normal_(weight, std=0.2)  # a trained encoder: its zero init is the identity
    d = model.canvas_length
    col = model.config.image_column
    img = {col: [[1] * model.config.image_canvas_length]} if task == "understanding" else {}
    other = {col: [[0] * model.config.image_canvas_length]} if task == "understanding" else {}
    zeros = torch.zeros(1, d, dtype=torch.long)
    red = _pooled(model, ["a red square"], zeros, **img)
    assert not torch.allclose(red, _pooled(model, ["a square red"], zeros, **img), atol=1e-4)
    torch.testing.assert_close(red, _pooled(model, ["a red square"], torch.ones_like(zeros), **other))
    # The encoder sees only the prompt, with relative positions: padding beside a longer prompt
    # changes nothing, and an empty prompt gives a finite (all-zero-weight) pool.
    pair = {k: v * 2 for k, v in img.items()}
    both = _pooled(model, ["a red square", "red"], torch.zeros(2, d, dtype=torch.long), **pair)
    torch.testing.assert_close(both[:1], red)
    torch.testing.assert_close(both[1:], _pooled(model, ["red"], zeros, **img))
    assert torch.isfinite(_pooled(model, [""], zeros, **img)).all()


def test_encoder_pooling_starts_as_mean_pooling():
    torch.manual_seed(0)
    enc = tiny_model("uniform", condition_pooling="encoder").eval()
    torch.manual_seed(0)
    mean = tiny_model("uniform", condition_pooling="mean").eval()
    mean.load_state_dict(enc.state_dict(), strict=False)
    zeros = torch.zeros(1, enc.canvas_length, dtype=torch.long)
    for prompt in ("a red square", "a square red"):
        torch.testing.assert_close(_pooled(enc, [prompt], zeros), _pooled(mean, [prompt], zeros))


@pytest.mark.parametrize("task", ["t2i", "understanding"])
def test_ordered_pooling_reads_word_order_and_only_the_prompt(task, tmp_path):
    model = tiny_model("uniform", task=task, condition_pooling="ordered").eval()
    torch.nn.init.normal_(model.condition_order["mix"][-1].weight, std=0.2)  # trained: zero init is the mean
    d = model.canvas_length
    col = model.config.image_column
    img = {col: [[1] * model.config.image_canvas_length]} if task == "understanding" else {}
    other = {col: [[0] * model.config.image_canvas_length]} if task == "understanding" else {}
    zeros = torch.zeros(1, d, dtype=torch.long)
    red = _pooled(model, ["a red square"], zeros, **img)
    assert not torch.allclose(red, _pooled(model, ["a square red"], zeros, **img), atol=1e-4)
    # Neither the canvas nor the condition image is read; each row's padding is its own.
    torch.testing.assert_close(red, _pooled(model, ["a red square"], torch.ones_like(zeros), **other))
    pair = {k: v * 2 for k, v in img.items()}
    both = _pooled(model, ["a red square", "red"], torch.zeros(2, d, dtype=torch.long), **pair)
    torch.testing.assert_close(both[:1], red)
    torch.testing.assert_close(both[1:], _pooled(model, ["red"], zeros, **img))
    model.save_pretrained(tmp_path)
    loaded = DFMTransformer.from_pretrained(tmp_path).eval()
    assert loaded.config.condition_pooling == "ordered"
    torch.testing.assert_close(_pooled(loaded, ["a red square"], zeros, **img), red)


def test_ordered_pooling_starts_as_mean_pooling():
    torch.manual_seed(0)
    ordered = tiny_model("uniform", condition_pooling="ordered").eval()
    torch.manual_seed(0)
    mean = tiny_model("uniform", condition_pooling="mean").eval()
    mean.load_state_dict(ordered.state_dict(), strict=False)
    zeros = torch.zeros(1, ordered.canvas_length, dtype=torch.long)
    for prompt in ("a red square", "a square red"):
        torch.testing.assert_close(_pooled(ordered, [prompt], zeros), _pooled(mean, [prompt], zeros))


def test_pooling_values_are_checked_and_true_means_mean(tmp_path):
    assert tiny_model("uniform", condition_pooling=True).config.condition_pooling == "mean"
    assert tiny_model("uniform", condition_pooling=True).condition_mixer is None
    with pytest.raises(ValueError, match="condition_pooling must be"):
        tiny_model("uniform", condition_pooling="attention")
    model = tiny_model("uniform", condition_pooling="positional").eval()
    model.save_pretrained(tmp_path)
    loaded = DFMTransformer.from_pretrained(tmp_path).eval()
    assert loaded.config.condition_pooling == "positional"
    zeros = torch.zeros(1, model.canvas_length, dtype=torch.long)
    torch.testing.assert_close(_pooled(model, ["a red square"], zeros), _pooled(loaded, ["a red square"], zeros))


def _expected_2d(model: DFMTransformer) -> torch.Tensor:
    h, w = model.config.image_shape
    rows = torch.arange(h).repeat_interleave(w)
    cols = torch.arange(w).repeat(h)
    return model.embed_rows(rows) + model.embed_cols(cols)


def test_2d_positions_go_to_image_tokens_in_row_major_order():
    model = tiny_model("uniform", image_shape=(2, 3), image_position_2d=True).eval()
    batch = model.prepare_flow_inputs(["a red square"], tiny_tokenizer())
    ids = batch.with_canvas(torch.zeros(1, model.canvas_length, dtype=torch.long))
    ids = torch.where(batch.canvas_mask, ids + model.config.text_vocab_size, ids)  # as forward shifts them
    emb = model._image_positions(ids)[0]
    torch.testing.assert_close(emb[batch.canvas_mask[0]], _expected_2d(model))
    assert emb[~batch.canvas_mask[0]].abs().sum() == 0


def test_2d_positions_go_to_the_condition_image_not_the_answer():
    model = tiny_model("uniform", task="understanding", image_shape=(2, 3), image_position_2d=True).eval()
    n_img = model.config.image_canvas_length
    batch = model.prepare_flow_inputs(["red square"], tiny_tokenizer(), **{model.config.image_column: [[1] * n_img]})
    emb = model._image_positions(batch.input_ids)[0]
    torch.testing.assert_close(emb[:n_img], _expected_2d(model))
    assert emb[n_img:].abs().sum() == 0
    assert tiny_model("uniform").config.image_position_2d is False
