"""FUDOKI's sequence layouts, built as its inference scripts build them.

Both tasks use the ``"fudoki"`` conversation template (DeepSeek separators: ``sep = "\\n\\n"``,
``sep2 = "<｜end▁of▁sentence｜>"``, roles ``User``/``Assistant``) and a fixed total length
``max_length = txt_max_length + 576`` (FUDOKI: 500 + 576 = 1076).

Text-to-image::

    <bos> User: {prompt}\\n\\nAssistant: <begin_of_image> [N image slots = canvas] <end_of_image> <pad>…

Classifier-free guidance replaces the prompt span (after ``<bos>`` up to ``<begin_of_image>``) with
the unconditional token, FUDOKI's literal id 100015 (:data:`FUDOKI_UNCOND_TOKEN_ID`). Understanding::

    <bos> {system}\\n\\nUser: <begin_of_image> [N slots ← SigLIP features]
          <end_of_image>{question}\\n\\nAssistant: [answer canvas]

The answer canvas fills the rest of the sequence, so ``D = max_length − prompt length`` (FUDOKI);
in a batch of prompts of different lengths every row gets the ``D`` of the longest prompt and
shorter rows end in padding, which the bidirectional mask excludes, so each row's logits are those
FUDOKI computes for it alone with that ``D``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch

from ..base import FlowInputs
from .checkpoint import BOI_TAG, EOI_TAG, IMAGE_TAG

EOS_TAG = "<｜end▁of▁sentence｜>"
DEFAULT_SYSTEM_PROMPT = (
    "You are a helpful language and vision assistant. "
    "You are able to understand the visual content that the user provides, "
    "and assist the user with a variety of tasks using natural language."
)
# FUDOKI: txt_max_length 500 plus the 576 image slots.
DEFAULT_MAX_LENGTH = 500 + 576
# The dataset column that carries the understanding image (TRL treats ``image``/``images`` itself).
IMAGE_COLUMN = "input_image"

PadTo = Literal["longest", "max_length"]

# FUDOKI's unconditional (CFG) token. Its code writes this literal id over the prompt span and never
# asks the tokenizer: ``CFGScaledModel.forward(..., uncond_id=100015)`` (``fudoki/eval_loop.py``) when
# sampling, ``MultiModalityCausalLM.token_drop(..., uncond_id=100015)``
# (``fudoki/janus/models/modeling_vlm.py``) in training, so the weights learned embedding row 100015
# as "no prompt", whatever a tokenizer calls it.
FUDOKI_UNCOND_TOKEN_ID = 100015
# The token at that id in the Janus (DeepSeek-LLM) tokenizer FUDOKI builds on: the pad token. FUDOKI's
# code never names it; Janus-1.3B's special_tokens_map.json sets pad_token "<｜▁pad▁｜>", and the
# generation config of its converted copies has pad_token_id 100015 (not checked against the files of
# LucasJinWang/FUDOKI itself). A tokenizer with anything else there is not the vocabulary the weights
# were trained with.
FUDOKI_UNCOND_TOKEN = "<｜▁pad▁｜>"
# Padding is a different matter. FUDOKI pads with ``VLChatProcessor.pad_id`` = the tokenizer's
# pad_token_id, or its eos_token_id when it has no pad token (``fudoki/janus/models/processing_vlm.py``),
# not with 100015. Those ids never reach the model: text-to-image padding lies outside
# attention_mask (excluded as keys) and understanding padding is the answer canvas, overwritten by
# x_0 noise before the first forward (``inference_t2i_local.py``, ``inference_i2t_local.py``). So a pad
# id other than 100015 is no error: the layouts pad by FUDOKI's rule and keep the CFG id apart.


@dataclass(frozen=True)
class FudokiTokens:
    """The token ids the layouts need."""

    bos: int | None
    eos: int | None
    pad: int
    image: int
    boi: int
    eoi: int
    uncond: int | None

    @classmethod
    def from_tokenizer(cls, tokenizer: Any, uncond: int | None = FUDOKI_UNCOND_TOKEN_ID) -> FudokiTokens:
        """Ids from ``tokenizer``; ``uncond`` is the CFG token (FUDOKI's literal id, never the
        tokenizer's pad; ``None``: no unconditional input)."""
        vocab = tokenizer.get_vocab()
        # FUDOKI's VLChatProcessor.pad_id: the pad token, else eos (see the note above the class).
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        if pad is None:
            raise ValueError(
                "the tokenizer defines neither a pad nor an eos token; FUDOKI pads with one of them"
            )
        return cls(
            bos=tokenizer.bos_token_id,
            eos=vocab.get(EOS_TAG, tokenizer.eos_token_id),
            pad=int(pad),
            image=vocab[IMAGE_TAG],
            boi=vocab[BOI_TAG],
            eoi=vocab[EOI_TAG],
            uncond=None if uncond is None else int(uncond),
        )


def check_tokenizer(
    tokenizer: Any,
    *,
    text_vocab_size: int,
    image_token_id: int | None,
    uncond_token_id: int,
    uncond_is_fudokis: bool,
) -> None:
    """Raise ``ValueError`` (what differs, what to do) if ``tokenizer`` cannot give a FUDOKI model
    the ids FUDOKI's code gives it.

    Checks FUDOKI's image tokens (``<image_placeholder>`` at the model's ``image_token_id``), that
    every id fits the language model's embedding, that prompts start with BOS (FUDOKI's
    LlamaTokenizerFast adds it and its layouts count on it: the CFG span starts at position 1), and,
    when the CFG id is FUDOKI's own 100015 (``uncond_is_fudokis``), that the tokenizer has FUDOKI's
    pad token there. An id given explicitly is trusted.
    """
    if not callable(tokenizer) or not all(
        callable(getattr(tokenizer, attr, None)) for attr in ("get_vocab", "convert_ids_to_tokens")
    ):
        raise TypeError(
            f"a FUDOKI tokenizer must be a transformers tokenizer, got {type(tokenizer).__name__}"
        )
    vocab = tokenizer.get_vocab()
    absent = [t for t in (IMAGE_TAG, BOI_TAG, EOI_TAG) if t not in vocab]
    if absent:
        raise ValueError(
            f"the tokenizer lacks FUDOKI's special tokens {absent}; use the checkpoint's tokenizer "
            "(dflow_trl.models.fudoki.checkpoint.load_tokenizer(folder))"
        )
    if image_token_id is not None and vocab[IMAGE_TAG] != image_token_id:
        raise ValueError(
            f"the tokenizer has {IMAGE_TAG} at id {vocab[IMAGE_TAG]} but the model's config.image_token_id "
            f"is {image_token_id}; the tokenizer and the model come from different checkpoints"
        )
    top = max(vocab.values())
    if top >= text_vocab_size:
        raise ValueError(
            f"the tokenizer has ids up to {top} but the language model embeds {text_vocab_size} tokens; "
            "the tokenizer and the model come from different checkpoints"
        )
    bos = tokenizer.bos_token_id
    probe = list(tokenizer("a", add_special_tokens=True)["input_ids"])
    if bos is None or probe[:1] != [bos]:
        raise ValueError(
            f"the tokenizer does not start its encodings with a BOS token (it encodes 'a' as {probe}, "
            f"bos_token_id {bos}); FUDOKI's LlamaTokenizerFast adds BOS (add_bos_token) and its layouts "
            "start with it. Load the tokenizer with "
            "dflow_trl.models.fudoki.checkpoint.load_tokenizer(folder), which adds BOS as FUDOKI's "
            "does even when tokenizer.json has no post-processor"
        )
    if uncond_is_fudokis:
        found = tokenizer.convert_ids_to_tokens(uncond_token_id)
        if found != FUDOKI_UNCOND_TOKEN:
            has = "has no token" if found is None else f"has {found!r}"
            raise ValueError(
                f"the tokenizer {has} at id {uncond_token_id}, where FUDOKI's tokenizer has its pad "
                f"token {FUDOKI_UNCOND_TOKEN!r}: FUDOKI writes the literal id {uncond_token_id} over the "
                "prompt for classifier-free guidance (and trained with it as the 'no prompt' token), so this "
                "tokenizer's ids are not the ones the weights were trained with. Use the checkpoint's own "
                "tokenizer; if this checkpoint's unconditional token really is another id, give it: "
                "FudokiForFlow.from_pretrained(..., uncond_token_id=ID), .attach(..., uncond_token_id=ID) "
                'or "uncond_token_id": ID in config.json'
            )


# ---------------------------------------------------------------------------------------------
# prompt text
# ---------------------------------------------------------------------------------------------
def _content_text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # TRL/transformers multimodal parts
        parts = []
        for part in content:
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text":
                parts.append(part.get("text", ""))
            elif kind == "image":
                parts.append(IMAGE_TAG)
            else:
                raise ValueError(
                    f"unsupported message content part {part!r}; expected type 'text' or 'image'"
                )
        return "".join(parts)
    raise ValueError(f"message content must be a string or a list of parts, got {type(content).__name__}")


def format_fudoki_prompt(prompt: str | Sequence[dict[str, Any]], system_prompt: str = "") -> str:
    """FUDOKI's ``"fudoki"`` template, ending in ``"Assistant:"``.

    ``prompt`` is the user's text or a TRL conversation (``[{"role": "system"|"user"|"assistant",
    "content": …}, …]``; a system message replaces ``system_prompt``).
    """
    if isinstance(prompt, str):
        turns = [("User", prompt)]
    elif isinstance(prompt, Sequence) and all(isinstance(m, dict) for m in prompt) and len(prompt) > 0:
        turns = []
        for msg in prompt:
            role = str(msg.get("role", "")).lower()
            text = _content_text(msg.get("content", ""))
            if role == "system":
                system_prompt = text
            elif role in ("user", "assistant"):
                turns.append((role.capitalize(), text))
            else:
                raise ValueError(
                    f"unsupported message role {msg.get('role')!r}; expected system, user or assistant"
                )
        if not turns or turns[0][0] != "User":
            raise ValueError("a FUDOKI conversation must start with a user message")
    else:
        raise ValueError(f"a prompt must be a string or a list of chat messages, got {type(prompt).__name__}")
    if turns[-1][0] == "Assistant" and turns[-1][1] == "":
        turns.pop()
    turns.append(("Assistant", ""))
    seps = ("\n\n", EOS_TAG)
    text = f"{system_prompt}{seps[0]}" if system_prompt else ""
    for i, (role, message) in enumerate(turns):
        message = message.strip()
        text += f"{role}: {message}{seps[i % 2]}" if message else f"{role}:"
    return text.strip()


def _encode(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=True)["input_ids"])


def _pad_rows(
    rows: list[list[int]], valid: list[int], length: int, pad: int
) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.full((len(rows), length), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), length), dtype=torch.long)
    for b, (row, n) in enumerate(zip(rows, valid)):
        ids[b, : len(row)] = torch.tensor(row, dtype=torch.long)
        mask[b, :n] = 1
    return ids, mask


# ---------------------------------------------------------------------------------------------
# text-to-image
# ---------------------------------------------------------------------------------------------
def build_t2i_inputs(
    prompts: Sequence[Any],
    tokenizer: Any,
    tokens: FudokiTokens,
    num_image_tokens: int,
    max_length: int = DEFAULT_MAX_LENGTH,
    pad_to: PadTo = "longest",
) -> FlowInputs:
    """Text-to-image rows with the image slots as the canvas (placeholder code 0)."""
    if not prompts:
        raise ValueError("no prompts given")
    rows, canvas_at, spans = [], [], []
    for prompt in prompts:
        ids = _encode(tokenizer, format_fudoki_prompt(prompt, system_prompt="") + BOI_TAG)
        if ids[-1] != tokens.boi:
            raise ValueError(f"tokenizing the prompt did not end in {BOI_TAG}; is the tokenizer FUDOKI's?")
        if tokens.bos is None or ids[0] != tokens.bos:
            raise ValueError(
                "FUDOKI's prompts start with BOS; the tokenizer did not add it (see load_tokenizer)"
            )
        # FUDOKI's text_token_mask, the CFG span: [1, end of "Assistant:"], i.e. up to <begin_of_image>.
        spans.append((1, len(ids) - 1))
        canvas_at.append(len(ids))
        row = ids + [0] * num_image_tokens + [tokens.eoi]
        if len(row) >= max_length:  # FUDOKI's own bound
            raise ValueError(
                f"prompt {prompt!r} needs {len(row)} tokens with its {num_image_tokens} image slots; "
                f"max_length is {max_length}"
            )
        rows.append(row)
    valid = [len(r) for r in rows]
    length = max_length if pad_to == "max_length" else max(valid)
    ids, mask = _pad_rows(rows, valid, length, tokens.pad)
    canvas = torch.zeros_like(ids, dtype=torch.bool)
    uncond = None if tokens.uncond is None else ids.clone()
    for b, (c0, (s0, s1)) in enumerate(zip(canvas_at, spans)):
        canvas[b, c0 : c0 + num_image_tokens] = True
        if uncond is not None:
            uncond[b, s0:s1] = tokens.uncond
    return FlowInputs(input_ids=ids, attention_mask=mask, canvas_mask=canvas, uncond_input_ids=uncond)


# ---------------------------------------------------------------------------------------------
# understanding
# ---------------------------------------------------------------------------------------------
def expand_image_placeholder(ids: list[int], tokens: FudokiTokens, num_image_tokens: int) -> list[int]:
    """``<image_placeholder>`` → ``<begin_of_image>`` + N slots + ``<end_of_image>`` (Janus'
    ``add_image_token``); at most one image per prompt."""
    where = [i for i, t in enumerate(ids) if t == tokens.image]
    if len(where) > 1:
        raise ValueError(
            f"a prompt holds {len(where)} {IMAGE_TAG} tokens; FUDOKI understanding takes one image"
        )
    if not where:
        return ids
    i = where[0]
    return ids[:i] + [tokens.boi] + [tokens.image] * num_image_tokens + [tokens.eoi] + ids[i + 1 :]


def build_understanding_inputs(
    prompts: Sequence[Any],
    tokenizer: Any,
    tokens: FudokiTokens,
    num_image_tokens: int,
    has_image: Sequence[bool],
    max_length: int = DEFAULT_MAX_LENGTH,
    answer_length: int | None = None,
    system_prompt: str = DEFAULT_SYSTEM_PROMPT,
) -> FlowInputs:
    """Understanding rows: the answer canvas follows ``"Assistant:"`` (placeholder: the pad token).

    ``has_image[b]`` says whether sample b comes with an image; if so and the prompt has no
    ``<image_placeholder>``, one is put in front of the question (FUDOKI's
    ``"<image_placeholder>{question}"``). ``answer_length`` fixes ``D``; by default
    ``D = max_length − longest prompt``.
    """
    if not prompts:
        raise ValueError("no prompts given")
    if len(has_image) != len(prompts):
        raise ValueError(f"{len(prompts)} prompts but {len(has_image)} image flags")
    rows = []
    for prompt, with_image in zip(prompts, has_image):
        if with_image:
            prompt = _with_image_tag(prompt)
        text = format_fudoki_prompt(prompt, system_prompt=system_prompt)
        if (IMAGE_TAG in text) != bool(with_image):
            raise ValueError(
                f"prompt {prompt!r} has {'an' if IMAGE_TAG in text else 'no'} {IMAGE_TAG} but "
                f"{'an image was' if with_image else 'no image was'} given"
            )
        rows.append(expand_image_placeholder(_encode(tokenizer, text), tokens, num_image_tokens))
    longest = max(len(r) for r in rows)
    d = answer_length if answer_length is not None else max_length - longest
    if d < 1:
        raise ValueError(
            f"the longest prompt takes {longest} tokens (image slots included), "
            "leaving no room for an answer "
            f"within max_length={max_length}; raise max_length or shorten the prompt"
        )
    valid = [len(r) + d for r in rows]
    ids, mask = _pad_rows([r + [tokens.pad] * d for r in rows], valid, longest + d, tokens.pad)
    canvas = torch.zeros_like(ids, dtype=torch.bool)
    for b, r in enumerate(rows):
        canvas[b, len(r) : len(r) + d] = True
    # FUDOKI never guides understanding; leaving this None makes a CFG request fail loudly.
    return FlowInputs(input_ids=ids, attention_mask=mask, canvas_mask=canvas, uncond_input_ids=None)


def _with_image_tag(prompt: Any) -> Any:
    if isinstance(prompt, str):
        return prompt if IMAGE_TAG in prompt else IMAGE_TAG + prompt
    msgs = [dict(m) for m in prompt]
    if any(IMAGE_TAG in _content_text(m.get("content", "")) for m in msgs):
        return msgs
    for m in msgs:
        if str(m.get("role", "")).lower() == "user":
            m["content"] = IMAGE_TAG + _content_text(m.get("content", ""))
            return msgs
    return msgs


def load_images(images: Sequence[Any]) -> list[Any]:
    """PIL images from PIL images, file paths or ``(3, H, W)`` / ``(H, W, 3)`` uint8 arrays."""
    from PIL import Image

    out = []
    for img in images:
        if isinstance(img, Image.Image):
            out.append(img.convert("RGB"))
        elif isinstance(img, str):
            with Image.open(img) as f:
                out.append(f.convert("RGB"))
        elif hasattr(img, "shape"):
            arr = torch.as_tensor(img)
            if arr.ndim == 3 and arr.shape[0] == 3 and arr.shape[-1] != 3:
                arr = arr.permute(1, 2, 0)
            if arr.dtype != torch.uint8:
                raise ValueError(
                    "image arrays must be uint8 (0–255); pass pixel_values for preprocessed tensors"
                )
            out.append(Image.fromarray(arr.cpu().numpy()).convert("RGB"))
        else:
            raise ValueError(
                f"an {IMAGE_COLUMN} entry must be a PIL image, a file path or an array, "
                f"got {type(img).__name__}"
            )
    return out
