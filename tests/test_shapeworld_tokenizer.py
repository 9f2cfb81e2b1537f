"""The ShapeWorld tokenizer and the answer canvas."""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from dflow_trl.tasks.shapeworld import (
    ANSWER_LENGTH,
    ANSWERS,
    MAX_TEXT_LENGTH,
    SPECIAL_TOKENS,
    build_shapeworld_tokenizer,
    decode_answer,
    encode_answer,
    make_vqa_dataset,
    normalize_answer,
)
from dflow_trl.tasks.shapeworld.tokenizer import all_texts, vocabulary


@pytest.fixture(scope="module")
def tok() -> PreTrainedTokenizerFast:
    return build_shapeworld_tokenizer()


def test_special_tokens_and_deterministic_vocab(tok):
    assert isinstance(tok, PreTrainedTokenizerFast)
    assert tok.convert_tokens_to_ids(list(SPECIAL_TOKENS)) == [0, 1, 2, 3, 4]
    assert (tok.pad_token_id, tok.unk_token_id, tok.mask_token_id, tok.sep_token_id) == (0, 1, 2, 4)
    assert tok.convert_tokens_to_ids("<uncond>") == 3 and "<uncond>" in tok.all_special_tokens
    assert tok.get_vocab() == {t: i for i, t in enumerate(vocabulary())}
    assert build_shapeworld_tokenizer().get_vocab() == tok.get_vocab()
    assert len(tok) == 50


def test_covers_all_text_lowercase_and_punctuation(tok):
    for text in all_texts():
        ids = tok(text)["input_ids"]
        assert tok.unk_token_id not in ids, text
        assert len(ids) <= MAX_TEXT_LENGTH
    assert tok("How many SQUARES are there?")["input_ids"] == tok("how many squares are there ?")["input_ids"]
    assert tok.convert_ids_to_tokens(tok("is there a red square?")["input_ids"])[-1] == "?"
    assert tok("a photo of a dog")["input_ids"][-1] == tok.unk_token_id
    for question in make_vqa_dataset("train", n=40)["prompt"]:
        assert tok.unk_token_id not in tok(question)["input_ids"]


def test_uncond_and_sep_are_never_split(tok):
    assert tok("<uncond> <sep> a square")["input_ids"][:2] == [3, 4]


def test_save_and_load_round_trip(tok, tmp_path):
    tok.save_pretrained(tmp_path)
    for loaded in (
        PreTrainedTokenizerFast.from_pretrained(tmp_path), AutoTokenizer.from_pretrained(tmp_path)
    ):
        assert loaded.get_vocab() == tok.get_vocab()
        assert loaded.pad_token_id == 0 and loaded.mask_token_id == 2 and loaded.sep_token_id == 4
        assert loaded.convert_tokens_to_ids("<uncond>") == 3 and "<uncond>" in loaded.all_special_tokens
        text = "a photo of an orange cross left of a diamond"
        assert loaded(text)["input_ids"] == tok(text)["input_ids"]


def test_answers_are_single_tokens_on_a_fixed_canvas(tok):
    assert ANSWER_LENGTH == 2
    for answer in ANSWERS:
        ids = encode_answer(answer, tok)
        assert len(ids) == ANSWER_LENGTH and ids[1] == tok.pad_token_id and ids[0] > 4
        assert decode_answer(ids, tok) == answer
    assert encode_answer("Three.", tok) == encode_answer("3", tok) == encode_answer("three", tok)
    assert decode_answer([tok.mask_token_id, tok.convert_tokens_to_ids("yes")], tok) == "yes"
    assert decode_answer([tok.pad_token_id, tok.pad_token_id], tok) == ""
    with pytest.raises(ValueError, match="outside"):
        encode_answer("magenta", tok)
    with pytest.raises(ValueError, match="canvas holds"):
        encode_answer("red and blue", tok)
    with pytest.raises(ValueError, match="no words"):
        encode_answer(" ? ", tok)


def test_normalize_answer():
    assert normalize_answer("  Left! ") == "left"
    assert normalize_answer("<mask> 2 <pad>") == "two"
    assert normalize_answer("<unk>") == ""
