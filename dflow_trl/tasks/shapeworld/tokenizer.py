"""The ShapeWorld word-level text tokenizer and the fixed-length answer canvas.

Lower-cased, split on whitespace and punctuation; one id per word of every prompt, question and
answer. Ids: the special tokens first (``<pad>`` 0, ``<unk>`` 1, ``<mask>`` 2, ``<uncond>`` 3,
``<sep>`` 4), then the words in sorted order, so the vocabulary never depends on set iteration order.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from .palette import COLORS
from .prompts import NUMBER_WORDS, all_prompts
from .scenes import RELATIONS
from .shapes import PLURALS, SHAPES
from .vqa import ANSWERS, QUESTION_TEMPLATES

PAD, UNK, MASK, UNCOND, SEP = "<pad>", "<unk>", "<mask>", "<uncond>", "<sep>"
SPECIAL_TOKENS: tuple[str, ...] = (PAD, UNK, MASK, UNCOND, SEP)
# Every answer is one word; the canvas keeps one spare slot (filled with <pad>) so a model can
# be caught emitting two words, which then fails exact match.
ANSWER_LENGTH = 2
# Longest prompt or question in tokens ("a photo of an orange square and a purple triangle" is 10).
MAX_TEXT_LENGTH = 16

_DIGITS = {str(n): word for n, word in NUMBER_WORDS.items()} | {"0": "zero"}
_SPECIAL_RE = re.compile("|".join(re.escape(t) for t in SPECIAL_TOKENS))
_PUNCT_RE = re.compile(r"[^\w\s]")


def _pre_tokenizer() -> pre_tokenizers.PreTokenizer:
    return pre_tokenizers.Whitespace()  # \w+|[^\w\s]+: words, and punctuation as its own token


def all_texts() -> list[str]:
    """Every prompt, every question the generators can ask, and every answer."""
    texts = [m["prompt"] for m in all_prompts()]
    for shape in SHAPES:
        texts.append(QUESTION_TEMPLATES["count"].format(plural=PLURALS[shape]))
        texts.append(QUESTION_TEMPLATES["color"].format(shape=shape))
        texts += [QUESTION_TEMPLATES["position"].format(shape=shape, other=o) for o in SHAPES if o != shape]
        for color in COLORS:
            for article in ("a", "an"):
                texts.append(QUESTION_TEMPLATES["exist"].format(article=article, color=color, shape=shape))
    texts += list(ANSWERS) + list(RELATIONS)
    return texts


def vocabulary() -> list[str]:
    """The tokenizer's tokens in id order."""
    pre = _pre_tokenizer()
    words = {w for text in all_texts() for w, _ in pre.pre_tokenize_str(text.lower())}
    return [*SPECIAL_TOKENS, *sorted(words)]


def build_shapeworld_tokenizer() -> PreTrainedTokenizerFast:
    """A fresh word-level tokenizer covering all ShapeWorld text (see the module docstring)."""
    vocab = {tok: i for i, tok in enumerate(vocabulary())}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = _pre_tokenizer()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token=PAD,
        unk_token=UNK,
        mask_token=MASK,
        sep_token=SEP,
        extra_special_tokens=[UNCOND],
        model_max_length=MAX_TEXT_LENGTH,
        padding_side="right",
    )


def normalize_answer(text: str) -> str:
    """Lower-case words without special tokens or punctuation, digits spelled out ("2" → "two")."""
    text = _PUNCT_RE.sub(" ", _SPECIAL_RE.sub(" ", text.lower()))
    return " ".join(_DIGITS.get(w, w) for w in text.split())


def encode_answer(answer: str, tokenizer: PreTrainedTokenizerFast) -> list[int]:
    """The answer as exactly ``ANSWER_LENGTH`` ids, right-padded with ``<pad>``."""
    words = normalize_answer(answer).split()
    if not words:
        raise ValueError(f"answer {answer!r} holds no words")
    if len(words) > ANSWER_LENGTH:
        raise ValueError(f"answer {answer!r} has {len(words)} words; the answer canvas holds {ANSWER_LENGTH}")
    ids = tokenizer.convert_tokens_to_ids(words)
    if tokenizer.unk_token_id in ids:
        raise ValueError(f"answer {answer!r} has words outside the ShapeWorld vocabulary")
    return ids + [tokenizer.pad_token_id] * (ANSWER_LENGTH - len(ids))


def decode_answer(ids: Sequence[int], tokenizer: PreTrainedTokenizerFast) -> str:
    """The words of an answer canvas, special tokens (padding, masks) dropped."""
    ids = [int(i) for i in ids]
    return normalize_answer(tokenizer.decode(ids, skip_special_tokens=True))
