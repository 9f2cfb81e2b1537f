"""FUDOKI on transformers' Janus classes, checked on tiny random checkpoints in FUDOKI's layout."""

from __future__ import annotations

import datetime
from pathlib import Path

import numpy as np
import pytest
import torch

from dflow_trl.models.base import check_flow_model
from dflow_trl.models.fudoki import FudokiForFlow
from dflow_trl.models.fudoki.checkpoint import (
    FudokiCheckpointError,
    is_fudoki_checkpoint,
    load_path_embedding,
)
from dflow_trl.models.fudoki.layout import DEFAULT_SYSTEM_PROMPT

from .fudoki_fixtures import (
    NUM_IMAGE_TOKENS,
    TINY,
    original_state_dict,
    reference_canvas_logits,
    write_tiny_fudoki_checkpoint,
)

T2I_PROMPTS = ["a red cat", "two dogs playing on the grass at night"]
QUESTIONS = ["What is shown?", "Describe the colours in detail, please."]
SMALL_MAX_LENGTH = 280  # understanding rows (byte-level tokens: the system prompt alone is ~200)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_fudoki_checkpoint(tmp_path_factory.mktemp("fudoki") / "ckpt")


@pytest.fixture(scope="module")
def sd() -> dict[str, torch.Tensor]:
    return original_state_dict(0)


def _load(ckpt: Path, **kw) -> FudokiForFlow:
    return FudokiForFlow.from_pretrained(ckpt, **kw).eval()


def _image(seed: int, h: int = 20, w: int = 40):
    from PIL import Image

    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


def _random_canvas(inputs, vocab: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return inputs.with_canvas(torch.randint(0, vocab, (inputs.batch_size, inputs.canvas_length), generator=g))


# ---- loading ------------------------------------------------------------------------------------
def test_loads_fudoki_layout_with_every_key_placed(ckpt: Path, sd: dict) -> None:
    assert is_fudoki_checkpoint(ckpt)
    model, info = FudokiForFlow.from_pretrained(ckpt, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    check_flow_model(model)
    state = model.state_dict()
    w = TINY["vis_width"]
    qkv = sd["vision_model.vision_tower.blocks.1.attn.qkv.weight"]
    assert torch.equal(state["model.vision_model.encoder.layers.1.self_attn.k_proj.weight"], qkv[w : 2 * w])
    assert torch.equal(
        state["model.vision_model.embeddings.position_embedding.weight"],
        sd["vision_model.vision_tower.pos_embed"][0],
    )
    # FUDOKI's LM head is its own matrix, not the input embedding.
    assert torch.equal(state["lm_head.weight"], sd["language_model.lm_head.weight"])
    assert model.lm_head.weight.data_ptr() != model.model.language_model.embed_tokens.weight.data_ptr()
    assert torch.equal(
        state["model.vqmodel.decoder.up.0.block.1.conv2.weight"],
        sd["gen_vision_model.decoder.conv_blocks.0.res.1.conv2.weight"],
    )
    assert torch.equal(
        state["model.vqmodel.encoder.mid.attn_1.q.weight"], sd["gen_vision_model.encoder.mid.1.q.weight"]
    )


def test_bin_weights_load_like_safetensors(tmp_path: Path, ckpt: Path) -> None:
    bin_ckpt = write_tiny_fudoki_checkpoint(tmp_path / "bin", weights="bin")
    a, b = _load(ckpt).state_dict(), _load(bin_ckpt).state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_unplaced_or_missing_weights_are_errors(tmp_path: Path, sd: dict) -> None:
    extra = dict(sd, **{"gen_head.extra_layer.weight": torch.zeros(2, 2)})
    with pytest.raises(FudokiCheckpointError, match=r"gen_head\.extra_layer\.weight"):
        FudokiForFlow.from_pretrained(write_tiny_fudoki_checkpoint(tmp_path / "extra", state_dict=extra))
    missing = {k: v for k, v in sd.items() if k != "language_model.model.layers.1.mlp.up_proj.weight"}
    with pytest.raises(FudokiCheckpointError, match=r"layers\.1\.mlp\.up_proj"):
        FudokiForFlow.from_pretrained(write_tiny_fudoki_checkpoint(tmp_path / "missing", state_dict=missing))


def test_path_embeddings_are_read_safely(tmp_path: Path, ckpt: Path) -> None:
    module = torch.load(
        ckpt / "image_embedding.pt", weights_only=False
    )  # our own file, for the expected value
    assert torch.equal(load_path_embedding(ckpt / "image_embedding.pt"), module.weight.detach())
    torch.save(module.weight.detach(), tmp_path / "plain.pt")
    torch.save({"weight": module.weight.detach()}, tmp_path / "state.pt")
    assert torch.equal(load_path_embedding(tmp_path / "plain.pt"), module.weight.detach())
    assert torch.equal(load_path_embedding(tmp_path / "state.pt"), module.weight.detach())
    torch.save({"weight": module.weight.detach(), "when": datetime.datetime(2020, 1, 1)}, tmp_path / "bad.pt")
    with pytest.raises(FudokiCheckpointError, match=r"datetime"):
        load_path_embedding(tmp_path / "bad.pt")


# ---- FUDOKI's forward ---------------------------------------------------------------------------
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_t2i_logits_equal_plain_torch_reference(ckpt: Path, sd: dict, attn: str) -> None:
    model = _load(ckpt, attn_implementation=attn).double()
    inputs = model.prepare_flow_inputs(T2I_PROMPTS)
    assert inputs.attention_mask[0].sum() < inputs.attention_mask[1].sum()  # row 0 is padded
    ids = _random_canvas(inputs, TINY["codebook"])
    with torch.no_grad():
        got = model.canvas_logits(ids, inputs.attention_mask, inputs.canvas_mask)
    ref = reference_canvas_logits(sd, ids, inputs.attention_mask, inputs.canvas_mask, "t2i")
    assert got.shape == (2, NUM_IMAGE_TOKENS, TINY["codebook"])
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=0)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_understanding_logits_equal_plain_torch_reference(ckpt: Path, sd: dict, attn: str) -> None:
    model = _load(ckpt, task="understanding", attn_implementation=attn, max_length=SMALL_MAX_LENGTH).double()
    inputs = model.prepare_flow_inputs(QUESTIONS, input_image=[_image(0), None])
    ids = _random_canvas(inputs, TINY["text_vocab"])
    with torch.no_grad():
        got = model.canvas_logits(ids, inputs.attention_mask, inputs.canvas_mask, **inputs.extra)
    pix = inputs.extra["pixel_values"]
    ref = reference_canvas_logits(
        sd, ids, inputs.attention_mask, inputs.canvas_mask, "understanding", model.config.image_token_id, pix
    )
    assert got.shape == (2, inputs.canvas_length, TINY["text_vocab"])
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=0)


@pytest.mark.parametrize("task", ["t2i", "understanding"])
def test_batch_of_two_equals_two_batches_of_one(ckpt: Path, task: str) -> None:
    model = _load(ckpt, task=task, answer_length=24)
    if task == "t2i":
        full, cols = model.prepare_flow_inputs(T2I_PROMPTS), [{}, {}]
        vocab = TINY["codebook"]
    else:
        imgs = [_image(1), _image(2, 40, 16)]  # two different images: each row must see its own
        full = model.prepare_flow_inputs(QUESTIONS, input_image=imgs)
        cols, vocab = [{"input_image": [imgs[0]]}, {"input_image": [imgs[1]]}], TINY["text_vocab"]
    canvas = torch.randint(0, vocab, (2, full.canvas_length), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        both = model.canvas_logits(
            full.with_canvas(canvas), full.attention_mask, full.canvas_mask, **full.extra
        )
        for b in range(2):
            one = model.prepare_flow_inputs([(T2I_PROMPTS if task == "t2i" else QUESTIONS)[b]], **cols[b])
            single = model.canvas_logits(
                one.with_canvas(canvas[b : b + 1]), one.attention_mask, one.canvas_mask, **one.extra
            )
            torch.testing.assert_close(both[b : b + 1], single, atol=1e-5, rtol=0)


def test_cfg_replaces_the_prompt_span_with_the_unconditional_token(ckpt: Path, sd: dict) -> None:
    model = _load(ckpt).double()
    tok = model.tokenizer
    inputs = model.prepare_flow_inputs(T2I_PROMPTS)
    cond, uncond, mask = inputs.input_ids, inputs.uncond_input_ids, inputs.attention_mask
    boi = tok.convert_tokens_to_ids("<begin_of_image>")
    for b in range(2):
        at_boi = int((cond[b] == boi).nonzero()[0, 0])
        assert uncond[b, 0] == cond[b, 0] == tok.bos_token_id
        assert (uncond[b, 1:at_boi] == tok.pad_token_id).all()  # FUDOKI's 100015 is the pad token
        assert torch.equal(uncond[b, at_boi:], cond[b, at_boi:])
    canvas = torch.randint(
        0, TINY["codebook"], (2, inputs.canvas_length), generator=torch.Generator().manual_seed(5)
    )
    with torch.no_grad():
        got_u = model.canvas_logits(inputs.with_canvas(canvas, unconditional=True), mask, inputs.canvas_mask)
        got_c = model.canvas_logits(inputs.with_canvas(canvas), mask, inputs.canvas_mask)
    ref_u = reference_canvas_logits(
        sd, inputs.with_canvas(canvas, unconditional=True), mask, inputs.canvas_mask, "t2i"
    )
    torch.testing.assert_close(got_u, ref_u, atol=1e-5, rtol=0)
    assert (got_u - got_c).abs().max() > 1e-3
    und = _load(ckpt, task="understanding", max_length=SMALL_MAX_LENGTH).prepare_flow_inputs(QUESTIONS)
    assert und.uncond_input_ids is None  # FUDOKI never guides understanding


def test_forward_with_canvas_mask_is_the_canvas_forward_and_trains_lora(ckpt: Path) -> None:
    from peft import LoraConfig, get_peft_model

    model = _load(ckpt)
    inputs = model.prepare_flow_inputs(T2I_PROMPTS[:1])
    ids = _random_canvas(inputs, TINY["codebook"])
    with torch.no_grad():
        a = model(input_ids=ids, attention_mask=inputs.attention_mask, canvas_mask=inputs.canvas_mask)
        b = model.canvas_logits(ids, inputs.attention_mask, inputs.canvas_mask)
    assert torch.equal(a, b)
    peft = get_peft_model(
        model,
        LoraConfig(
            r=4, lora_alpha=8, target_modules=FudokiForFlow.lora_target_modules, init_lora_weights=False
        ),
    )
    lora = {n for n, p in peft.named_parameters() if p.requires_grad}
    assert len(lora) == 2 * 7 * TINY["layers"] and all(".language_model.layers." in n for n in lora)
    peft.canvas_logits(ids, inputs.attention_mask, inputs.canvas_mask).logsumexp(-1).sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for n, p in peft.named_parameters() if n in lora)


# ---- layouts ------------------------------------------------------------------------------------
def test_t2i_layout_is_fudokis(ckpt: Path) -> None:
    model = _load(ckpt)
    tok = model.tokenizer
    inputs = model.prepare_flow_inputs([T2I_PROMPTS[0], [{"role": "user", "content": T2I_PROMPTS[1]}]])
    row = inputs.input_ids[0][inputs.attention_mask[0].bool()].tolist()
    canvas_at = inputs.canvas_mask[0].nonzero()[:, 0]
    assert (
        tok.decode(row[: int(canvas_at[0])])
        == f"{tok.bos_token}User: a red cat\n\nAssistant:<begin_of_image>"
    )
    assert len(canvas_at) == NUM_IMAGE_TOKENS and int(canvas_at[-1]) == len(row) - 2
    assert row[-1] == tok.convert_tokens_to_ids("<end_of_image>")
    assert (inputs.input_ids[0][~inputs.attention_mask[0].bool()] == tok.pad_token_id).all()
    # A chat-format prompt lays out exactly as the plain string.
    plain = model.prepare_flow_inputs(T2I_PROMPTS[1:])
    assert torch.equal(plain.input_ids[0], inputs.input_ids[1])
    model.pad_to = "max_length"
    assert model.prepare_flow_inputs(T2I_PROMPTS).input_ids.shape[1] == 1076
    model.max_length = 30
    with pytest.raises(ValueError, match="max_length"):
        model.prepare_flow_inputs(T2I_PROMPTS)


def test_understanding_layout_is_fudokis(ckpt: Path) -> None:
    model = _load(ckpt, task="understanding", max_length=SMALL_MAX_LENGTH)
    tok = model.tokenizer
    inputs = model.prepare_flow_inputs(QUESTIONS[:1], input_image=[_image(0)])
    row = inputs.input_ids[0].tolist()
    start = int(inputs.canvas_mask[0].nonzero()[0, 0])
    text = tok.decode(row[:start])
    assert text.startswith(
        f"{tok.bos_token}{DEFAULT_SYSTEM_PROMPT}\n\nUser: <begin_of_image><image_placeholder>"
    )
    assert text.endswith(f"<end_of_image>{QUESTIONS[0]}\n\nAssistant:")
    assert row.count(model.config.image_token_id) == NUM_IMAGE_TOKENS
    # The answer canvas runs to max_length (FUDOKI: attention over the whole row).
    assert inputs.canvas_length == SMALL_MAX_LENGTH - start and inputs.attention_mask.all()
    assert inputs.extra["pixel_values"].shape == (1, 3, TINY["image_size"], TINY["image_size"])
    # Grey padding to a square, mean = std = 0.5: the padded band is (127/255 - 0.5)/0.5.
    assert torch.allclose(inputs.extra["pixel_values"][0, :, 0, 0], torch.full((3,), 127 / 127.5 - 1))
    with pytest.raises(ValueError, match="image"):
        model.prepare_flow_inputs(["<image_placeholder>What?"])
    with pytest.raises(ValueError, match="max_length"):
        model.prepare_flow_inputs(["x " * 200])


def test_decoding(ckpt: Path) -> None:
    model = _load(ckpt)
    images = model.decode_canvas(torch.randint(0, TINY["codebook"], (3, NUM_IMAGE_TOKENS)))
    side = TINY["image_size"] // TINY["patch"] * 2 ** (len(TINY["vq_mult"]) - 1)
    assert len(images) == 3 and all(im.size == (side, side) and im.mode == "RGB" for im in images)
    model.set_task("understanding")
    tok = model.tokenizer
    answer = tok("The answer is B", add_special_tokens=False)["input_ids"]
    canvas = torch.tensor([answer + [tok.eos_token_id] + tok("junk", add_special_tokens=False)["input_ids"]])
    assert model.decode_canvas(canvas) == ["The answer is B"]


def test_paths_follow_the_task(ckpt: Path) -> None:
    model = _load(ckpt)
    assert model.canvas_kind == "image" and model.get_probability_path().vocab_size == TINY["codebook"]
    model.set_task("understanding")
    assert model.canvas_kind == "text" and model.get_probability_path().vocab_size == TINY["text_vocab"]
    with pytest.raises(ValueError, match="task"):
        model.set_task("caption")


def test_bad_inputs_are_clear_errors(ckpt: Path) -> None:
    model = _load(ckpt)
    inputs = model.prepare_flow_inputs(T2I_PROMPTS)
    ids, mask, canvas = inputs.input_ids, inputs.attention_mask, inputs.canvas_mask
    with pytest.raises(ValueError, match="codes"):
        model.canvas_logits(ids.masked_fill(canvas, TINY["codebook"]), mask, canvas)
    uneven = canvas.clone()
    uneven[0, int(canvas[0].nonzero()[0, 0])] = False
    with pytest.raises(ValueError, match="same number"):
        model.canvas_logits(ids, mask, uneven)
    first = torch.zeros_like(canvas)
    first[:, 0] = True
    with pytest.raises(ValueError, match="position 0"):
        model.canvas_logits(ids, mask, first)
    model.config._attn_implementation = "flash_attention_2"
    with pytest.raises(ValueError, match="sdpa"):
        model.canvas_logits(ids, mask, canvas)


# ---- saving -------------------------------------------------------------------------------------
def test_save_in_transformers_layout_round_trips(tmp_path: Path, ckpt: Path) -> None:
    from transformers import JanusForConditionalGeneration

    model = _load(ckpt)
    model.save_pretrained(tmp_path / "hf")
    _, info = JanusForConditionalGeneration.from_pretrained(tmp_path / "hf", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    again = _load(tmp_path / "hf")
    inputs = again.prepare_flow_inputs(T2I_PROMPTS)
    ids = _random_canvas(inputs, TINY["codebook"])
    with torch.no_grad():
        torch.testing.assert_close(
            again.canvas_logits(ids, inputs.attention_mask, inputs.canvas_mask),
            model.canvas_logits(ids, inputs.attention_mask, inputs.canvas_mask),
            atol=0,
            rtol=0,
        )
    for kind in ("image", "text"):
        assert torch.equal(again.path_embeddings[kind], model.path_embeddings[kind])
