"""Rewards for understanding tasks: multiple-choice letters (ScienceQA), exact and numeric answers, format."""

from __future__ import annotations

import math
import re
import string
from fractions import Fraction
from typing import Any

from ._inputs import column, completion_text

_DEFAULT_LETTERS = "ABCDEFGH"

# A letter as it appears in an answer: bracketed in any case, a capital standing alone, or a lowercase
# one followed by punctuation or the end (so the article in "the answer is a bird" is not taken for A).
_LETTER = (
    r"(?:\*\*|__)?(?:\(([A-Za-z])\)|\[([A-Za-z])\]|([A-Z])(?![A-Za-z0-9'])|([a-z])(?=\s*(?:[.):,]|\*\*|$)))"
)
# Keywords match in any case; the letter itself keeps _LETTER's case rules.
_ANSWER_STATEMENT = re.compile(
    r"(?i:\banswers?\b\s*(?:is|was|would be|should be)?\s*(?:[:\-=]\s*)?(?:option|choice|letter)?)\s*"
    + _LETTER
)
_CHOICE_STATEMENT = re.compile(
    r"(?i:\b(?:option|choice|choose|select|pick)\b\s*(?:is\s*)?(?:[:\-=]\s*)?)" + _LETTER
)
_BARE = re.compile(r"[\s(\[{*\"'`]*([A-Za-z])[\s)\]}*.:,\"'`]*")
_LEADING = re.compile(r"\s*(?:\*\*)?[(\[]?([A-Za-z])(?:[)\].:]|\*\*)")
_BRACKETED = re.compile(r"[(\[]([A-Za-z])[)\]]")
_CAPITAL = re.compile(r"(?<![A-Za-z0-9'])([A-Z])(?![A-Za-z0-9'])")
_ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>", re.DOTALL | re.IGNORECASE)
_BOXED = re.compile(r"\\boxed\{([^{}]*(?:\{[^{}]*\}[^{}]*)*)\}")
_NUMBER = re.compile(r"-?\d{1,3}(?:,\d{3})+(?:\.\d+)?|-?\d+(?:\.\d+)?(?:/\d+)?|-?\.\d+")


def _statement_letter(pattern: re.Pattern, text: str, allowed: str) -> str | None:
    found = [next(g for g in m.groups() if g) for m in pattern.finditer(text)]
    found = [letter.upper() for letter in found if letter.upper() in allowed]
    return found[-1] if found else None  # the last statement is the model's final word


def extract_choice_letter(
    text: str, num_choices: int | None = None, choices: list[str] | None = None
) -> str | None:
    """The option letter a response picks, or None when it names none (or several, ambiguously).

    Tries, in order: the whole response is a letter ("B", "b.", "(B)"); an answer statement ("The answer
    is (B).", "Answer: c"); a leading label ("B. Because …"); a single bracketed letter; a single stand-alone
    capital letter; and, when ``choices`` are given, a single option whose text the response contains.
    """
    if num_choices is None and choices is not None:
        num_choices = len(choices)
    if num_choices is not None and not 1 <= num_choices <= 26:
        raise ValueError(f"num_choices must be between 1 and 26, got {num_choices}")
    allowed = string.ascii_uppercase[:num_choices] if num_choices else _DEFAULT_LETTERS
    text = text.strip()
    bare = _BARE.fullmatch(text)
    if bare and bare.group(1).upper() in allowed:
        return bare.group(1).upper()
    for pattern in (_ANSWER_STATEMENT, _CHOICE_STATEMENT):
        letter = _statement_letter(pattern, text, allowed)
        if letter:
            return letter
    leading = _LEADING.match(text)
    if leading and leading.group(1).upper() in allowed:
        # "(A) or (B) …" names several options; a leading label only counts when it is the only one.
        others = {m.group(1).upper() for m in _BRACKETED.finditer(text)} & set(allowed)
        if others <= {leading.group(1).upper()}:
            return leading.group(1).upper()
    for pattern in (_BRACKETED, _CAPITAL):
        letters = {
            m.group(1).upper()
            for m in pattern.finditer(text)
            # "A" before a lower-case word ("A cat is …") is the article, not option A.
            if not (pattern is _CAPITAL and m.group(1) == "A" and re.match(r"\s+[a-z]", text[m.end() :]))
        } & set(allowed)
        if len(letters) == 1:
            return letters.pop()
        if len(letters) > 1:
            return None
    if choices:
        said = f" {normalize_answer(text)} "
        options = [normalize_answer(str(choice)) for choice in choices]
        hits = [i for i, option in enumerate(options) if option and f" {option} " in said]
        # Prefer the longest match so "red apple" beats "apple" when both are options.
        hits = [i for i in hits if not any(j != i and options[i] in options[j] for j in hits)]
        if len(hits) == 1:
            return string.ascii_uppercase[hits[0]]
    return None


def normalize_answer(text: str) -> str:
    """Lower-case, drop punctuation and English articles, collapse whitespace (SQuAD-style)."""
    text = text.lower()
    text = "".join(" " if ch in string.punctuation else ch for ch in text)
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def final_answer_text(text: str) -> str:
    """The part of a response holding its answer: ``<answer>…</answer>``, else ``\\boxed{…}``, else all
    of it."""
    tag = _ANSWER_TAG.findall(text)
    if tag:
        return tag[-1]
    boxed = _BOXED.findall(text)
    if boxed:
        return boxed[-1]
    return text


def parse_number(text: str) -> float | None:
    """The last number in a text ("1,234.5", "-3", "3/4", ".5"), or None."""
    found = _NUMBER.findall(text)
    if not found:
        return None
    token = found[-1].replace(",", "")
    try:
        return float(Fraction(token)) if "/" in token else float(token)
    except (ValueError, ZeroDivisionError):
        return None


def _answer_letter(answer: Any, choices: list[str] | None, index: int) -> str:
    if isinstance(answer, bool):
        raise ValueError(
            f"sample {index}: the multiple-choice answer is a bool ({answer}); use a letter or 0-based index"
        )
    if isinstance(answer, int):
        if answer < 0 or (choices is not None and answer >= len(choices)) or answer >= 26:
            raise ValueError(f"sample {index}: answer index {answer} is out of range for choices {choices}")
        return string.ascii_uppercase[answer]
    if isinstance(answer, str):
        letter = (
            extract_choice_letter(answer, choices=choices) if len(answer.strip()) <= 4 or choices else None
        )
        if letter is None and choices:
            matches = [
                i for i, c in enumerate(choices) if normalize_answer(str(c)) == normalize_answer(answer)
            ]
            letter = string.ascii_uppercase[matches[0]] if len(matches) == 1 else None
        if letter is not None:
            return letter
    raise ValueError(
        f"sample {index}: cannot read the correct option from answer {answer!r}; give a letter ('B'), "
        "a 0-based index (ScienceQA's format) or the text of one of the choices"
    )


class MultipleChoiceReward:
    """1.0 when the letter extracted from the completion is the correct option, else 0.0 (also when none)."""

    def __init__(self, answer_column: str = "answer", choices_column: str | None = "choices") -> None:
        self.__name__ = "mc_letter"
        self.answer_column = answer_column
        self.choices_column = choices_column

    def __call__(
        self, prompts: list, completions: list, completion_ids: Any = None, **kwargs: Any
    ) -> list[float]:
        n = len(completions)
        answers = column(kwargs, self.answer_column, n, self.__name__)
        has_choices = self.choices_column is not None and self.choices_column in kwargs
        all_choices = column(kwargs, self.choices_column, n, self.__name__) if has_choices else [None] * n
        rewards = []
        for index, (completion, answer, choices) in enumerate(zip(completions, answers, all_choices)):
            choices = list(choices) if choices is not None else None
            picked = extract_choice_letter(final_answer_text(completion_text(completion)), choices=choices)
            rewards.append(float(picked is not None and picked == _answer_letter(answer, choices, index)))
        return rewards


class ExactMatchReward:
    """1.0 when the normalised final answer equals the (or one of the) normalised reference answer(s)."""

    def __init__(self, answer_column: str = "answer") -> None:
        self.__name__ = "exact_match"
        self.answer_column = answer_column

    def __call__(
        self, prompts: list, completions: list, completion_ids: Any = None, **kwargs: Any
    ) -> list[float]:
        answers = column(kwargs, self.answer_column, len(completions), self.__name__)
        rewards = []
        for completion, answer in zip(completions, answers):
            references = answer if isinstance(answer, (list, tuple)) else [answer]
            said = normalize_answer(final_answer_text(completion_text(completion)))
            rewards.append(float(any(said == normalize_answer(str(ref)) for ref in references)))
        return rewards


class NumericMatchReward:
    """1.0 when the last number of the final answer equals the reference within tolerance, else 0.0."""

    def __init__(self, answer_column: str = "answer", rel_tol: float = 1e-6, abs_tol: float = 1e-9) -> None:
        self.__name__ = "numeric_match"
        self.answer_column = answer_column
        self.rel_tol = rel_tol
        self.abs_tol = abs_tol

    def __call__(
        self, prompts: list, completions: list, completion_ids: Any = None, **kwargs: Any
    ) -> list[float]:
        answers = column(kwargs, self.answer_column, len(completions), self.__name__)
        rewards = []
        for index, (completion, answer) in enumerate(zip(completions, answers)):
            if isinstance(answer, (int, float)) and not isinstance(answer, bool):
                reference = float(answer)
            else:
                reference = parse_number(str(answer))  # GSM8K-style "… #### 42" ends with the number
                if reference is None:
                    raise ValueError(f"sample {index}: reference answer {answer!r} contains no number")
            value = parse_number(final_answer_text(completion_text(completion)))
            ok = value is not None and math.isclose(
                value, reference, rel_tol=self.rel_tol, abs_tol=self.abs_tol
            )
            rewards.append(float(ok))
        return rewards


DEFAULT_FORMAT = r"\s*<think>.*?</think>\s*<answer>.*?</answer>\s*"


class FormatReward:
    """1.0 when the whole completion matches a regular expression (default:
    ``<think>…</think><answer>…</answer>``)."""

    def __init__(self, pattern: str = DEFAULT_FORMAT, name: str = "format") -> None:
        try:
            self.pattern = re.compile(pattern, re.DOTALL)
        except re.error as error:
            raise ValueError(
                f"format reward pattern {pattern!r} is not a valid regular expression: {error}"
            ) from error
        self.__name__ = name

    def __call__(
        self, prompts: list, completions: list, completion_ids: Any = None, **kwargs: Any
    ) -> list[float]:
        return [float(self.pattern.fullmatch(completion_text(c)) is not None) for c in completions]


def mc_letter(**kwargs: Any) -> MultipleChoiceReward:
    return MultipleChoiceReward(**kwargs)


def exact_match(**kwargs: Any) -> ExactMatchReward:
    return ExactMatchReward(**kwargs)


def numeric_match(**kwargs: Any) -> NumericMatchReward:
    return NumericMatchReward(**kwargs)


def format_reward(**kwargs: Any) -> FormatReward:
    return FormatReward(**kwargs)
