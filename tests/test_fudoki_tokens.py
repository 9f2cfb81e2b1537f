"""FUDOKI's token ids: BOS as its LlamaTokenizerFast adds it, its literal CFG id 100015, its padding.

The expected rows are written out by hand from FUDOKI's code path (fudoki-hku/FUDOKI@7c5695a):
``inference_t2i_local.py`` / ``inference_i2t_local.py`` build the prompt with
``VLChatProcessor.apply_sft_template_for_multi_turn_prompts`` (``fudoki/janus/models/processing_vlm.py``,
the ``"fudoki"`` template of ``fudoki/janus/utils/conversation.py``), encode it with
``vl_chat_processor.tokenizer.encode`` (``LlamaTokenizerFast``: ``<bos>`` + the text, whatever
``tokenizer.json``'s post-processor says), append the image slots and pad with
``vl_chat_processor.pad_id`` to ``txt_max_length + 576``; ``fudoki/eval_loop.py`` writes 100015 over
the ``text_token_mask`` span for CFG.

Token ids of the fixtures' byte-level tokenizer (``tests/fudoki_fixtures.py``): printable ASCII ``c``
is ``ord(c) - 33``, a space (``Ġ``) 220, a newline (``Ċ``) 198; merges ``As`` 256, ``Ass`` 257,
``Assi`` 258, ``Us`` 259; GPT-2 pre-tokenisation splits ``"\\n\\nAssistant"`` into ``"\\n"``, ``"\\n"``,
``"Assistant"``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from dflow_trl.models.fudoki import FudokiForFlow
from dflow_trl.models.fudoki.checkpoint import (
    janus_config_from_fudoki,
    load_path_embedding,
    load_tokenizer,
)
from dflow_trl.models.fudoki.layout import FUDOKI_UNCOND_TOKEN_ID

from .fudoki_fixtures import (
    BOI,
    BOS,
    EOI,
    EOS,
    IMAGE,
    NUM_IMAGE_TOKENS,
    PAD,
    REAL_IDS,
    TINY,
    TINY_IDS,
    TINY_REAL_VOCAB,
    with_tokenizer,
    write_tiny_fudoki_checkpoint,
    write_tokenizer,
)

# "User: a red cat\n\nAssistant:" (system prompt "") + "<begin_of_image>", without its BOS:
#  U s   e   r   :   ␣   a   ␣   r   e   d   ␣   c   a   t   \n   \n   Assi s   t   a   n   t   :
T2I_TEXT = [259, 68, 81, 25, 220, 64, 220, 81, 68, 67, 220, 66, 64, 83, 198, 198, 258, 82, 83, 64, 77, 83, 25]
# "Be brief.\n\nUser: " | <image_placeholder> | "What?\n\nAssistant:" (system prompt "Be brief."):
#  B   e   ␣    b   r   i   e   f   .   \n   \n   Us   e   r   :   ␣
UND_BEFORE_IMAGE = [33, 68, 220, 65, 81, 72, 68, 69, 13, 198, 198, 259, 68, 81, 25, 220]
#  W   h   a   t   ?   \n   \n   Assi s   t   a   n   t   :
UND_AFTER_IMAGE = [54, 71, 64, 83, 30, 198, 198, 258, 82, 83, 64, 77, 83, 25]


def _fudoki_t2i_row(ids: dict[str, int], pad: int, length: int) -> tuple[list[int], list[int]]:
    """FUDOKI's t2i ``input_ids`` before the image slots, and after them (``<end_of_image>``, then
    ``pad_id`` up to ``length``)."""
    prefix = [ids[BOS], *T2I_TEXT, ids[BOI]]
    return prefix, [ids[EOI]] + [pad] * (length - len(prefix) - NUM_IMAGE_TOKENS - 1)


def _load(folder: Path, **kw) -> FudokiForFlow:
    return FudokiForFlow.from_pretrained(folder, **kw).eval()


@pytest.fixture(scope="module")
def real(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny checkpoint with FUDOKI's 102400 text tokens and specials at DeepSeek's ids, its
    config.json as FUDOKI publishes it (no uncond_token_id)."""
    return write_tiny_fudoki_checkpoint(
        tmp_path_factory.mktemp("fudoki_real") / "ckpt",
        t=TINY_REAL_VOCAB,
        uncond_token_id=None,
        special_ids=REAL_IDS,
    )


# ---- BOS: FUDOKI's LlamaTokenizerFast adds it whatever tokenizer.json says ----------------------
@pytest.mark.parametrize("post_processor", ["bos", None, "eos"])
def test_t2i_ids_are_fudokis_with_any_post_processor(tmp_path: Path, post_processor: str | None) -> None:
    ckpt = write_tiny_fudoki_checkpoint(tmp_path / "ckpt", post_processor=post_processor)
    model = _load(ckpt)
    model.pad_to, model.max_length = "max_length", 60
    inputs = model.prepare_flow_inputs(["a red cat"])
    row = inputs.input_ids[0].tolist()
    # inference_t2i_local.py: encode(sft + "<begin_of_image>") = [bos, text…, boi]; then 576 (here 16)
    # image slots, <end_of_image>, pad_id (the pad token, 262) up to the fixed length.
    prefix, suffix = _fudoki_t2i_row(TINY_IDS, TINY_IDS[PAD], 60)
    assert prefix == [260, *T2I_TEXT, 264] and suffix[:2] == [265, 262]
    c0 = len(prefix)
    assert row[:c0] == prefix and row[c0 + NUM_IMAGE_TOKENS :] == suffix
    assert inputs.canvas_mask[0].nonzero()[:, 0].tolist() == list(range(c0, c0 + NUM_IMAGE_TOKENS))
    assert inputs.attention_mask[0].tolist() == [1] * (c0 + NUM_IMAGE_TOKENS + 1) + [0] * (len(suffix) - 1)
    # eval_loop.py: the uncond id over text_token_mask = [1, end of "Assistant:"] (the fixture's
    # config names the tiny vocabulary's unconditional token: its pad token, 262).
    uncond = inputs.uncond_input_ids[0].tolist()
    assert uncond[:c0] == [260] + [262] * len(T2I_TEXT) + [264] and uncond[c0:] == row[c0:]


@pytest.mark.parametrize("post_processor", ["bos", None, "eos"])
def test_understanding_ids_are_fudokis_with_any_post_processor(
    tmp_path: Path, post_processor: str | None
) -> None:
    from PIL import Image

    ckpt = write_tiny_fudoki_checkpoint(tmp_path / "ckpt", post_processor=post_processor)
    model = _load(ckpt, task="understanding", max_length=80)
    model.system_prompt = "Be brief."  # FUDOKI's path with VLChatProcessor.system_prompt = "Be brief."
    image = Image.fromarray(np.zeros((8, 8, 3), dtype=np.uint8))
    inputs = model.prepare_flow_inputs(["What?"], input_image=[image])
    row = inputs.input_ids[0].tolist()
    # inference_i2t_local.py: encode(sft) = [bos, text…]; add_image_token turns the placeholder into
    # <begin_of_image> + 576 (here 16) slots + <end_of_image> (FUDOKI then zeroes the slot ids, whose
    # embeddings SigLIP features replace; we keep <image_placeholder> there, as transformers' Janus
    # does); pad_id up to the fixed length, the padding being the answer canvas.
    prompt = [260, *UND_BEFORE_IMAGE, 264, *[263] * NUM_IMAGE_TOKENS, 265, *UND_AFTER_IMAGE]
    assert row == prompt + [262] * (80 - len(prompt))
    assert inputs.canvas_mask[0].nonzero()[:, 0].tolist() == list(range(len(prompt), 80))
    assert bool(inputs.attention_mask.all())  # FUDOKI: attention_mask[:] = True


def test_add_bos_token_false_is_refused(tmp_path: Path) -> None:
    ckpt = write_tiny_fudoki_checkpoint(tmp_path / "ckpt", add_bos_token=False)
    with pytest.raises(ValueError, match=r"BOS.*add_bos_token"):
        FudokiForFlow.from_pretrained(ckpt)


def test_a_tokenizer_without_bos_is_refused_at_call_time(tmp_path: Path) -> None:
    from transformers import PreTrainedTokenizerFast

    ckpt = write_tiny_fudoki_checkpoint(tmp_path / "ckpt", post_processor=None)
    model = _load(ckpt)
    plain = PreTrainedTokenizerFast.from_pretrained(str(ckpt))  # keeps tokenizer.json as is: no BOS
    assert plain("a")["input_ids"] == [64]
    with pytest.raises(ValueError, match=r"does not start its encodings with a BOS.*load_tokenizer"):
        model.prepare_flow_inputs(["a red cat"], processing_class=plain)
    assert load_tokenizer(ckpt)("a")["input_ids"] == [260, 64]


# ---- the CFG id: FUDOKI's literal 100015, not the tokenizer's ------------------------------------
@pytest.mark.parametrize(
    ("pad_token", "fudoki_pad"),
    [(PAD, 100015), (None, 100001), (EOS, 100001)],  # FUDOKI's pad_id: the pad token, else EOS
)
def test_cfg_writes_fudokis_100015_whatever_the_tokenizers_pad(
    real: Path, tmp_path: Path, pad_token: str | None, fudoki_pad: int
) -> None:
    ckpt = (
        real
        if pad_token == PAD
        else with_tokenizer(real, tmp_path / "ckpt", special_ids=REAL_IDS, pad_token=pad_token)
    )
    model = _load(ckpt)
    assert model.tokenizer.pad_token_id == (None if pad_token is None else REAL_IDS[pad_token])
    model.pad_to, model.max_length = "max_length", 60
    inputs = model.prepare_flow_inputs(["a red cat"])
    prefix, suffix = _fudoki_t2i_row(REAL_IDS, fudoki_pad, 60)
    assert prefix[0] == 100000 and prefix[-1] == 100016
    c0 = len(prefix)
    assert inputs.input_ids[0, :c0].tolist() == prefix
    assert inputs.input_ids[0, c0 + NUM_IMAGE_TOKENS :].tolist() == suffix
    uncond = inputs.uncond_input_ids[0].tolist()
    assert uncond[:c0] == [100000] + [100015] * len(T2I_TEXT) + [100016]
    assert model.uncond_token_id == FUDOKI_UNCOND_TOKEN_ID == 100015
    # Row 100015 exists in this vocabulary: the unconditional forward runs.
    with torch.no_grad():
        logits = model.canvas_logits(
            inputs.with_canvas(torch.zeros(1, NUM_IMAGE_TOKENS, dtype=torch.long), unconditional=True),
            inputs.attention_mask,
            inputs.canvas_mask,
        )
    assert bool(torch.isfinite(logits).all())


def test_a_tokenizer_that_puts_another_token_at_100015_is_refused(real: Path, tmp_path: Path) -> None:
    # The pad token one id lower, and <begin_of_image> where FUDOKI's pad is.
    shifted = dict(REAL_IDS, **{PAD: 100014, BOI: 100015})
    ckpt = with_tokenizer(real, tmp_path / "shifted", special_ids=shifted)
    with pytest.raises(
        ValueError, match=r"has '<begin_of_image>' at id 100015.*'<｜▁pad▁｜>'.*uncond_token_id"
    ):
        FudokiForFlow.from_pretrained(ckpt)
    # Nothing at 100015 at all.
    sparse = dict(REAL_IDS, **{PAD: 100014})
    with pytest.raises(ValueError, match=r"has no token at id 100015"):
        FudokiForFlow.from_pretrained(with_tokenizer(real, tmp_path / "sparse", special_ids=sparse))
    # A checkpoint whose unconditional token really is another id says so, and gets it.
    model = _load(ckpt, uncond_token_id=100014)
    inputs = model.prepare_flow_inputs(["a red cat"])
    c0 = len(T2I_TEXT) + 2
    assert inputs.uncond_input_ids[0, :c0].tolist() == [100000] + [100014] * len(T2I_TEXT) + [100015]


def test_a_vocabulary_without_100015_needs_the_id(tmp_path: Path) -> None:
    ckpt = write_tiny_fudoki_checkpoint(tmp_path / "ckpt", uncond_token_id=None)
    with pytest.raises(
        ValueError, match=r"100015 \(FUDOKI's literal id\) is outside .* 320 tokens.*uncond_token_id"
    ):
        FudokiForFlow.from_pretrained(ckpt)
    model = _load(ckpt, uncond_token_id=7)
    assert model.uncond_token_id == 7
    inputs = model.prepare_flow_inputs(["a red cat"])
    assert (inputs.uncond_input_ids[0, 1 : len(T2I_TEXT) + 1] == 7).all()
    with pytest.raises(ValueError, match="outside"):
        _load(ckpt, uncond_token_id=320)


def test_the_uncond_id_is_saved_with_the_config(tmp_path: Path) -> None:
    ckpt = write_tiny_fudoki_checkpoint(tmp_path / "ckpt", uncond_token_id=None)
    model = _load(ckpt, uncond_token_id=5)
    model.save_pretrained(tmp_path / "hf")
    again = _load(tmp_path / "hf")
    assert again.uncond_token_id == 5
    a, b = model.prepare_flow_inputs(["a red cat"]), again.prepare_flow_inputs(["a red cat"])
    assert torch.equal(a.input_ids, b.input_ids) and torch.equal(a.uncond_input_ids, b.uncond_input_ids)
    assert again.tokenizer("a")["input_ids"] == [260, 64]


# ---- attach: a model built in memory --------------------------------------------------------------
def _in_memory(folder: Path) -> tuple[FudokiForFlow, object]:
    from dflow_trl.models.fudoki.checkpoint import read_config
    from dflow_trl.models.fudoki.modeling import _token_ids

    tok = load_tokenizer(folder)
    model = FudokiForFlow._from_config(janus_config_from_fudoki(read_config(folder), _token_ids(tok)))
    return model.eval(), tok


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_fudoki_checkpoint(
        tmp_path_factory.mktemp("fudoki_attach") / "ckpt", uncond_token_id=None
    )


def test_attach_gives_an_in_memory_model_what_from_pretrained_reads(ckpt: Path) -> None:
    loaded = _load(ckpt, uncond_token_id=TINY_IDS[PAD])
    model, tok = _in_memory(ckpt)
    model.load_state_dict(loaded.state_dict())
    image = torch.nn.Embedding.from_pretrained(load_path_embedding(ckpt / "image_embedding.pt"))
    text = load_path_embedding(ckpt / "text_embedding.pt")
    out = model.attach(tok, image_embeddings=image, text_embeddings=text, uncond_token_id=TINY_IDS[PAD])
    assert out is model and model.tokenizer is tok
    a, b = model.prepare_flow_inputs(["a red cat"]), loaded.prepare_flow_inputs(["a red cat"])
    for name in ("input_ids", "attention_mask", "canvas_mask", "uncond_input_ids"):
        assert torch.equal(getattr(a, name), getattr(b, name))
    with torch.no_grad():
        torch.testing.assert_close(
            model.canvas_logits(a.input_ids, a.attention_mask, a.canvas_mask),
            loaded.canvas_logits(b.input_ids, b.attention_mask, b.canvas_mask),
            atol=0,
            rtol=0,
        )
    for task in ("t2i", "understanding"):
        model.set_task(task), loaded.set_task(task)
        assert torch.equal(model.get_probability_path().unit, loaded.get_probability_path().unit)
    # The default image processor is FUDOKI's preprocessing at the tower's size.
    from PIL import Image

    img = Image.fromarray(np.arange(5 * 9 * 3, dtype=np.uint8).reshape(5, 9, 3))
    assert torch.equal(
        model.image_processor(images=[img], return_tensors="pt")["pixel_values"],
        loaded.image_processor(images=[img], return_tensors="pt")["pixel_values"],
    )
    # A kind not given keeps its matrix; one given replaces it and its cached path.
    new_image = torch.randn(TINY["codebook"], TINY["code_dim"])
    model.set_task("t2i")
    model.attach(tok, image_embeddings=new_image)
    assert torch.equal(model.path_embeddings["text"], text)
    assert torch.equal(model.path_embeddings["image"], new_image)
    unit = model.get_probability_path().unit
    torch.testing.assert_close(unit, torch.nn.functional.normalize(new_image.to(unit.dtype), dim=-1))


def test_attach_refuses_bad_inputs_and_changes_nothing(ckpt: Path, tmp_path: Path) -> None:
    from transformers import PreTrainedTokenizerFast

    model, tok = _in_memory(ckpt)
    good = torch.randn(TINY["codebook"], TINY["code_dim"])
    pad = TINY_IDS[PAD]
    cases = [
        (dict(image_embeddings=good[:-1]), ValueError, r"63 rows but the VQ codebook has 64"),
        (
            dict(text_embeddings=good),
            ValueError,
            r"text_embeddings .* 64 rows but the text vocabulary has 320",
        ),
        (dict(image_embeddings=good[0]), ValueError, r"\(V, E\) floating matrix"),
        (dict(image_embeddings=good.long()), ValueError, r"floating matrix"),
        (dict(image_embeddings=good.numpy()), TypeError, r"tensor or an nn.Embedding"),
        (
            dict(image_embeddings=good.index_fill(0, torch.tensor([3]), float("nan"))),
            ValueError,
            "non-finite",
        ),
        (
            dict(image_embeddings=good.index_fill(0, torch.tensor([3]), 0.0)),
            ValueError,
            r"rows \[3\] are zero",
        ),
        (dict(uncond_token_id=320), ValueError, r"outside the language model's vocabulary of 320"),
        (dict(uncond_token_id=True), TypeError, "int token id"),
        (dict(image_processor="processor"), TypeError, "image processor"),
    ]
    for kwargs, error, message in cases:
        kwargs.setdefault("uncond_token_id", pad)
        with pytest.raises(error, match=message):
            model.attach(tok, **kwargs)
    # Without an id, the tiny vocabulary has no room for FUDOKI's 100015.
    with pytest.raises(ValueError, match=r"100015 \(FUDOKI's literal id\) is outside"):
        model.attach(tok, image_embeddings=good)
    with pytest.raises(TypeError, match="transformers tokenizer"):
        model.attach("tokenizer", uncond_token_id=pad)
    # A tokenizer of another checkpoint: its <image_placeholder> is not this model's image_token_id.
    other = tmp_path / "other"
    other.mkdir()
    write_tokenizer(other, special_ids=dict(TINY_IDS, **{IMAGE: 300}))
    with pytest.raises(
        ValueError, match=r"<image_placeholder> at id 300 but the model's config.image_token_id is 263"
    ):
        model.attach(load_tokenizer(other), uncond_token_id=pad)
    # Ids beyond the language model's vocabulary.
    big = tmp_path / "big"
    big.mkdir()
    write_tokenizer(big, special_ids=dict(TINY_IDS, **{EOI: 400}))
    with pytest.raises(ValueError, match=r"ids up to 400 but the language model embeds 320"):
        model.attach(load_tokenizer(big), uncond_token_id=pad)
    # No BOS, and no image tokens.
    nobos = tmp_path / "nobos"
    nobos.mkdir()
    write_tokenizer(nobos, post_processor=None)
    with pytest.raises(ValueError, match="BOS"):
        model.attach(PreTrainedTokenizerFast.from_pretrained(str(nobos)), uncond_token_id=pad)
    # Nothing was attached by any failed call.
    assert model.tokenizer is None and model.path_embeddings == {} and model.image_processor is None
    assert getattr(model.config, "uncond_token_id", None) is None
    # A model without a tokenizer takes one per call, checked the same way.
    model.attach(None, image_embeddings=good, uncond_token_id=pad)
    with pytest.raises(ValueError, match=r"no tokenizer.*attach"):
        model.prepare_flow_inputs(["a red cat"])
    assert model.prepare_flow_inputs(["a red cat"], processing_class=tok).input_ids[0, 0] == TINY_IDS[BOS]
    with pytest.raises(ValueError, match="BOS"):
        model.prepare_flow_inputs(
            ["a red cat"], processing_class=PreTrainedTokenizerFast.from_pretrained(str(nobos))
        )


def test_the_image_tokens_are_required(ckpt: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    model, _ = _in_memory(ckpt)
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    raw = Tokenizer(models.BPE(vocab={ch: i for i, ch in enumerate(alphabet)}, merges=[]))
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    plain = PreTrainedTokenizerFast(tokenizer_object=raw)
    with pytest.raises(
        ValueError, match=r"lacks FUDOKI's special tokens \['<image_placeholder>', '<begin_of_image>'"
    ):
        model.attach(plain, uncond_token_id=TINY_IDS[PAD])
