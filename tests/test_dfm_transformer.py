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


def _trained(model: DFMTransformer) -> DFMTransformer:
    """Give an order-aware route's zero-initialised output layers weights, as training would:
    at zero init both routes are the mean pool."""
    if model.condition_encoder is not None:
        for weight in (
            model.condition_encoder.self_attn.o_proj.weight, model.condition_encoder.mlp.down_proj.weight
        ):
            torch.nn.init.normal_(weight, std=0.2)
    if model.condition_order is not None:
        torch.nn.init.normal_(model.condition_order["mix"][-1].weight, std=0.2)
    return model


@pytest.mark.parametrize("pooling", ["encoder", "ordered"])
@pytest.mark.parametrize("task", ["t2i", "understanding"])
def test_order_aware_pooling_reads_word_order_and_only_the_prompt(task, pooling, tmp_path):
    model = _trained(tiny_model("uniform", task=task, condition_pooling=pooling).eval())
    d = model.canvas_length
    col = model.config.image_column
    img = {col: [[1] * model.config.image_canvas_length]} if task == "understanding" else {}
    other = {col: [[0] * model.config.image_canvas_length]} if task == "understanding" else {}
    zeros = torch.zeros(1, d, dtype=torch.long)
    red = _pooled(model, ["a red square"], zeros, **img)
    assert not torch.allclose(red, _pooled(model, ["a square red"], zeros, **img), atol=1e-4)
    # Neither the canvas nor the condition image is read.
    torch.testing.assert_close(red, _pooled(model, ["a red square"], torch.ones_like(zeros), **other))
    # Each row's padding is its own: padding beside a longer prompt changes nothing, and an
    # empty prompt gives a finite (all-zero-weight) pool.
    pair = {k: v * 2 for k, v in img.items()}
    both = _pooled(model, ["a red square", "red"], torch.zeros(2, d, dtype=torch.long), **pair)
    torch.testing.assert_close(both[:1], red)
    torch.testing.assert_close(both[1:], _pooled(model, ["red"], zeros, **img))
    assert torch.isfinite(_pooled(model, [""], zeros, **img)).all()
    model.save_pretrained(tmp_path)
    loaded = DFMTransformer.from_pretrained(tmp_path).eval()
    assert loaded.config.condition_pooling == pooling
    torch.testing.assert_close(_pooled(loaded, ["a red square"], zeros, **img), red)


@pytest.mark.parametrize("pooling", ["encoder", "ordered"])
def test_order_aware_pooling_starts_as_mean_pooling(pooling):
    torch.manual_seed(0)
    aware = tiny_model("uniform", condition_pooling=pooling).eval()
    torch.manual_seed(0)
    mean = tiny_model("uniform", condition_pooling="mean").eval()
    mean.load_state_dict(aware.state_dict(), strict=False)
    zeros = torch.zeros(1, aware.canvas_length, dtype=torch.long)
    for prompt in ("a red square", "a square red"):
        torch.testing.assert_close(_pooled(aware, [prompt], zeros), _pooled(mean, [prompt], zeros))


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
    torch.testing.assert_close(
        _pooled(model, ["a red square"], zeros), _pooled(loaded, ["a red square"], zeros)
    )


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
    batch = model.prepare_flow_inputs(
        ["red square"], tiny_tokenizer(), **{model.config.image_column: [[1] * n_img]}
    )
    emb = model._image_positions(batch.input_ids)[0]
    torch.testing.assert_close(emb[:n_img], _expected_2d(model))
    assert emb[n_img:].abs().sum() == 0
    assert tiny_model("uniform").config.image_position_2d is False


def test_an_over_long_prompt_warns_and_keeps_its_last_tokens():
    model, tok = tiny_model("uniform"), tiny_tokenizer()
    n = model.config.max_prompt_length
    long = " ".join(["a", "red", "square", "of", "a", "blue", "circle"])
    expected = rf"1 of 2 prompts are longer than the model's max_prompt_length={n} "
    with pytest.warns(UserWarning, match=expected):
        batch = model.prepare_flow_inputs([long, "a red square"], tok)
    kept = tok(long, add_special_tokens=False)["input_ids"][-n:]
    assert batch.input_ids[0, :n].tolist() == kept
