"""Rewards for understanding tasks: multiple-choice letters (ScienceQA), exact and numeric answers, format."""

from __future__ import annotations

import itertools
import math
import re
import string
import unicodedata
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
    r"(?i:(?:\banswers?\b|答案)\s*(?:is|was|would be|should be|是|为)?\s*(?:[:\-=：]\s*)?[*_]*\s*"
    r"(?:option|choice|letter)?)\s*" + _LETTER
)
# A verb of choosing, or "option/choice is|:" ("the correct option is B"); a bare mention ("Option A is
# wrong") is not a statement.
_CHOICE_STATEMENT = re.compile(
    r"(?i:(?:\b(?:choose|chose|select|selected|pick|picked|go with)\b\s*(?:(?:option|choice|letter)\b)?"
    r"|\b(?:option|choice)\b\s*(?:is\b|[:\-=]))\s*(?:[:\-=]\s*)?)" + _LETTER
)
_BARE = re.compile(r"[\s(\[{*\"'`]*([A-Za-z])[\s)\]}*.:,\"'`]*")
_LEADING = re.compile(r"\s*(?:\*\*)?[(\[]?([A-Za-z])(?:[)\].:]|\*\*)")
_BRACKETED = re.compile(r"[(\[]([A-Za-z])[)\]]")
_CAPITAL = re.compile(r"(?<![A-Za-z0-9'])([A-Z])(?![A-Za-z0-9'])")
# An option label as in an echoed option list ("A. red B. blue", "a) red", "(A) red").
_LABEL = re.compile(r"(?<![A-Za-z0-9'])(?:[(\[]([A-Za-z])[)\]]|([A-Z])[.):]|([a-z])\))(?=\s|$)")
# Any stand-alone letter, for finding letters joined by "or", "and", "/", "," ("A or B", "(A) and (C)").
_TOKEN = re.compile(r"(?<![A-Za-z0-9'])(?:\(([A-Za-z])\)|\[([A-Za-z])\]|([A-Za-z]))(?![A-Za-z0-9'])")
_CONNECTOR = re.compile(
    r"(?i)[\s*_]*(?:,[\s*_]*(?:(?:or|and)\b[\s*_]*)?"
    r"|(?:[/&+、，]|或者?|和|\b(?:and/or|or|and|nor|versus|vs)\b\.?)[\s*_]*)(?:(?:option|choice)\s*)?"
)
_NEGATION = re.compile(
    r"(?i:\b(?:not|isn't|aren't|wasn't|never|rather than|instead of|except|excluding)\s+)"
    r"(?i:(?:option|choice|letter)\s*)?[*_\"'`]*[(\[]?$"
)
_NEGATION_WORDS = re.compile(
    r"\b(?:not|isn t|aren t|wasn t|never|rather than|instead of|except|excluding)\s*$"
)
# A self-correction: what follows it replaces the answer before it ("D? No wait, it's B", "actually C").
_CORRECTION = re.compile(
    r"(?i:\b(?:no,?\s+wait|wait|actually|correction|on second thought|scratch that|i mean)\b|等等|不对|更正)"
    r"[\s,.:;!?—–-]*"
)
_ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>", re.DOTALL | re.IGNORECASE)
_BOXED = re.compile(r"\\boxed\{([^{}]*(?:\{[^{}]*\}[^{}]*)*)\}")


def _letter_of(match: re.Match) -> tuple[str, int]:
    """The letter a match of a pattern with one group per letter form names, and where it stands."""
    index = next(i for i, g in enumerate(match.groups(), 1) if g)
    return match.group(index), match.start(index)


def _is_word(text: str, letter: str, position: int) -> bool:
    """Whether a single letter is a word rather than an option: the article "A"/"a" or the pronoun "I"
    before a lower-case word ("A cat", "I think"), or another lower-case letter not set off by
    punctuation."""
    rest = text[position + 1 :]
    if letter.islower():
        return not re.match(r"\s*(?:[.):,;/&]|\*\*|$)|\s+(?:or|and|nor)\b", rest)
    return letter in "AI" and bool(re.match(r"\s+(?!(?:and|or|nor)\b)[a-z]", rest))


def _negated(text: str, position: int) -> bool:
    return _NEGATION.search(text, max(0, position - 40), position) is not None


def _hedged(text: str, allowed: str) -> set[int]:
    """Positions of option letters joined to another option letter by "or", "and", "/", ","…: a hedge."""
    tokens = []
    for match in _TOKEN.finditer(text):
        letter, position = _letter_of(match)
        if letter.upper() in allowed and not (match.group(3) and _is_word(text, letter, position)):
            tokens.append((match.start(), match.end(), position))
    hedged: set[int] = set()
    for (_, end, a), (start, _, b) in itertools.pairwise(tokens):
        if _CONNECTOR.fullmatch(text, end, start):
            hedged |= {a, b}
    return hedged


def _pick(text: str, allowed: str, options: list[str]) -> tuple[str | None, bool]:
    """The letter a passage commits to, or None; and whether it names any option at all (a correction
    that names options without committing to one voids the answer before it)."""
    text = text.strip()
    bare = _BARE.fullmatch(text)
    if bare and bare.group(1).upper() in allowed:
        return bare.group(1).upper(), True
    hedged = _hedged(text, allowed)
    for pattern in (_ANSWER_STATEMENT, _CHOICE_STATEMENT):
        found = [_letter_of(m) for m in pattern.finditer(text)]
        found = [(letter.upper(), pos) for letter, pos in found if letter.upper() in allowed]
        if found:
            letter, position = found[-1]  # the last statement is the model's final word
            return (None if position in hedged else letter), True
    leading = _LEADING.match(text)
    if leading and leading.group(1).upper() in allowed and leading.start(1) not in hedged:
        # A leading label only counts when it is the only label: "(A) or (B) …" and an echoed option
        # list ("A. red B. blue") name several.
        labels = {
            letter.upper()
            for letter, pos in map(_letter_of, (*_LABEL.finditer(text), *_BRACKETED.finditer(text)))
            if not _negated(text, pos)
        } & set(allowed)
        if labels <= {leading.group(1).upper()}:
            return leading.group(1).upper(), True
    named = False
    for pattern in (_BRACKETED, _CAPITAL):
        affirmed: set[str] = set()
        for match in pattern.finditer(text):
            letter, position = _letter_of(match)
            if letter.upper() not in allowed or (pattern is _CAPITAL and _is_word(text, letter, position)):
                continue
            named = True
            if position in hedged:
                return None, True
            if not _negated(text, position):
                affirmed.add(letter.upper())
        if len(affirmed) == 1:
            return affirmed.pop(), True
        if len(affirmed) > 1:
            return None, True
    if options:
        said = f" {normalize_answer(text)} "
        hits = [i for i, option in enumerate(options) if option and f" {option} " in said]
        # Prefer the longest match so "red apple" beats "apple" when both are options.
        hits = [i for i in hits if not any(j != i and options[i] in options[j] for j in hits)]
        affirmed_hits = [
            i
            for i in hits
            if any(
                not _NEGATION_WORDS.search(said, max(0, m.start() - 30), m.start() + 1)
                for m in re.finditer(re.escape(f" {options[i]} "), said)
            )
        ]
        if len(affirmed_hits) == 1:
            return string.ascii_uppercase[affirmed_hits[0]], True
        named = named or bool(hits)
    return None, named


def extract_choice_letter(
    text: str, num_choices: int | None = None, choices: list[str] | None = None
) -> str | None:
    """The option letter a response picks, or None when it names none, hedges or only rules options out.

    Tries, in order: the whole response is a letter ("B", "b.", "(B)"); an answer statement ("The answer
    is (B).", "Answer: c", "答案：B"); a leading label ("B. Because …"); a single bracketed letter; a single
    stand-alone capital letter; and, when ``choices`` are given, a single option whose text the response
    contains. A hedge ("A or B", "The answer is B or C", "(A) and (B)"), an echoed option list ("A. red
    B. blue") and a negation ("Not B.") give None, since a reward must not pay for them. After a
    self-correction ("D? No wait, it's B", "actually C", "correction: A") the corrected answer counts.
    """
    if num_choices is None and choices is not None:
        num_choices = len(choices)
    if num_choices is not None and not 1 <= num_choices <= 26:
        raise ValueError(f"num_choices must be between 1 and 26, got {num_choices}")
    allowed = string.ascii_uppercase[:num_choices] if num_choices else _DEFAULT_LETTERS
    options = [normalize_answer(str(choice)) for choice in choices] if choices else []
    text = text.strip()
    for marker in reversed(list(_CORRECTION.finditer(text))):
        letter, named = _pick(text[marker.end() :], allowed, options)
        if named:
            return letter
        # Nothing named after it ("… B. Actually, that was easy."): the answer before it stands.
        text = text[: marker.start()]
    return _pick(text, allowed, options)[0]


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


# -- numbers ------------------------------------------------------------------------------------------------

_DASHES = str.maketrans(
    {"\u2212": "-", "\u2012": "-", "\u2013": "-", "\ufe63": "-", "\uff0d": "-", "\u2044": "/", "\u2215": "/"}
)
_SUPERSCRIPTS = str.maketrans("⁰¹²³⁴⁵⁶⁷⁸⁹⁻⁺", "0123456789-+")
_VULGAR = {ch: Fraction(unicodedata.numeric(ch)).limit_denominator(10) for ch in "½⅓⅔¼¾⅕⅖⅗⅘⅙⅚⅐⅛⅜⅝⅞⅑⅒"}
# Thousands may be grouped by a space, no-break space, thin space or narrow no-break space.
_SPACE = "[ \u00a0\u2009\u202f]"
_DEC = rf"(?:\d{{1,3}}(?:,\d{{3}})+(?!\d)|\d{{1,3}}(?:{_SPACE}\d{{3}})+(?!\d)|\d+)(?:\.\d+)?|\.\d+"
_NUMERIC = re.compile(
    rf"""(?P<sign>[-+])?(?:
        (?:(?P<whole>\d+){_SPACE}?)?\\frac\s*\{{\s*(?P<fnum>[-+]?(?:{_DEC}))\s*\}}\s*\{{\s*(?P<fden>[-+]?(?:{_DEC}))\s*\}}
      | (?P<mwhole>\d+){_SPACE}+(?P<mnum>\d+)/(?P<mden>\d+)(?![\d.,/])
      | (?:(?P<vwhole>\d+){_SPACE}?)?(?P<vulgar>[{"".join(_VULGAR)}])
      | (?P<num>{_DEC})/(?P<den>{_DEC})
      | (?P<mant>{_DEC})(?:[eE](?P<exp>[-+]?\d+)|\s*[×*·x]\s*10\^\{{?(?P<exp10>[-+]?\d+)\}}?)
      | (?P<base>{_DEC})(?:\^\{{?(?P<power>[-+]?\d+)\}}?|(?P<sup>[⁻⁺]?[⁰¹²³⁴⁵⁶⁷⁸⁹]+))
      | (?P<plain>{_DEC})
    )""",
    re.VERBOSE,
)
_SCALES = {"hundred": 100, "thousand": 10**3, "million": 10**6, "billion": 10**9, "trillion": 10**12}
_SCALE_AFTER = re.compile(r"(?:\s+(?:hundred|thousand|million|billion|trillion)\b)+", re.IGNORECASE)
_DENOMINATORS = (
    r"half|halves|quarters?|thirds?|point|dozens?|(?:four|fif|six|seven|eigh|nin|ten|eleven|twelf|thirteen"
    r"|fourteen|fifteen|sixteen|seventeen|eighteen|nineteen|twentie|thirtie|fortie|fiftie|sixtie|seventie"
    r"|eightie|ninetie|hundred|thousand|million|billion)ths?"
)
# What makes the number next to it part of something else: a longer malformed number ("1.2.3", "3:45",
# "1,23", "1 0000"), an exponent or index ("x^2", "x_1"), a root, an inequality, the argument of a function
# ("\sqrt{3}", "log(8)"), or an operand of an arithmetic expression ("5 + 3", "x - 2").
_GLUED_BEFORE = re.compile(
    r"(?:\d[.,:/'’_ \u00a0\u2009\u202f]?|[\^_]\{?|[±√∛]|(?<![-=])[<>≤≥≠]\s*"
    r"|\\(?:sqrt|frac|binom|pm|mp|le|leq|ge|geq|lt|gt|neq|ne|sum|prod|int|lim)\s*(?:\[[^\]]*\])?\s*\{?"
    r"|\\?\b(?:log|ln|exp|sin|cos|tan|sqrt)(?:_\{?\w+\}?)?\s*[({]?"
    r"|(?:\d|[)\]}]|(?<![A-Za-z])[A-Za-z])\s*[-+*/×÷]\s*)$"
)
# A sign glued to a word or a number is a hyphen or an operator ("COVID-19", "3-5", "5 -3").
_SIGN_GLUED = re.compile(r"(?:[A-Za-z0-9)\]}%]|(?:\d|[)\]}]|(?<![A-Za-z])[A-Za-z])\s+)$")
_GLUED_AFTER = re.compile(
    r"\s*\^|\s*[-+*/×÷]\s*(?:[\d(\\]|[A-Za-z](?![A-Za-z]))|\s*(?:\\(?:pi|sqrt|pm|mp)\b|[π√±])"
    rf"|[\s-]+(?:and\s+(?:a|an|one)\s+)?(?:{_DENOMINATORS})\b",
    re.IGNORECASE,
)

_UNIT_WORDS = (
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen "
    "seventeen eighteen nineteen"
)
_UNITS = {word: value for value, word in enumerate(_UNIT_WORDS.split())}
_TEN_WORDS = "twenty thirty forty fifty sixty seventy eighty ninety"
_TENS = {word: 10 * value for value, word in enumerate(_TEN_WORDS.split(), 2)}
_NUMBER_WORD = "|".join((*_UNITS, *_TENS, *_SCALES))
_WORD_PHRASE = re.compile(
    rf"\b(?:(?P<neg>minus|negative)\s+)?(?:an?\s+(?=(?:{'|'.join(_SCALES)})\b))?"
    rf"(?P<words>(?:{_NUMBER_WORD})\b(?:(?:\s+and\s+|\s+|-)(?:{_NUMBER_WORD})\b)*)",
    re.IGNORECASE,
)
_WORD_AFTER = re.compile(
    rf"[\s-]+(?:and\s+(?:a|an|one)\s+)?(?:{_DENOMINATORS}|first|second)\b", re.IGNORECASE
)
# Words that make a number word part of a decimal, fraction, range or sum ("three point five").
_WORD_BEFORE = re.compile(r"\b(?:point|over|divided by|times|plus|to)\s+$", re.IGNORECASE)
_PRONOUN_BEFORE = re.compile(r"\b(?:the|this|that|each|every|any|no|some|which|another|other|a)\s+$", re.I)
_PRONOUN_AFTER = re.compile(r"\s+(?:of|another|by|who|that|which)\b", re.IGNORECASE)


def _clean(text: str) -> str:
    """One spelling for the ways numbers are typeset: ASCII digits and minus, plain LaTeX."""
    if not text.isascii():
        text = re.sub(r"\d", lambda m: str(unicodedata.digit(m.group())), text.translate(_DASHES))
    text = re.sub(r"\\[dt]frac\b", r"\\frac", text)
    text = re.sub(
        r"\\(?:text|textbf|textrm|mathrm|mathbf|mbox|boxed|displaystyle|left|right)\b|\\!|\\?\$", "", text
    )
    text = re.sub(r"\^\s*\{?\s*\\circ\s*\}?|\\circ\b|\\degree\b", "°", text)
    text = re.sub(r"\\(?:times|cdot)\b", "×", text)
    text = text.replace("\\div", "÷").replace("\\%", "%").replace("{,}", ",")
    return re.sub(r"(?<=\d)(?:\\[,;: ]|~)(?=\d)", "\u2009", text)


def _dec(token: str) -> Fraction:
    return Fraction(re.sub(r"[, \u00a0\u2009\u202f]", "", token))


def _power(base: Fraction, exponent: int) -> Fraction:
    if abs(exponent) > 1000:
        raise ValueError("exponent out of range")
    return base**exponent


def _mixed(whole: str | None, fraction: Fraction) -> Fraction:
    if whole is None:
        return fraction
    if not 0 < fraction < 1:  # "2 3/2" is not a mixed number
        raise ValueError("improper mixed number")
    return int(whole) + fraction


def _match_value(match: re.Match) -> Fraction | None:
    g = match.groupdict()
    try:
        if g["fnum"] is not None:
            value = _mixed(g["whole"], _dec(g["fnum"]) / _dec(g["fden"]))
        elif g["mnum"] is not None:
            value = _mixed(g["mwhole"], Fraction(int(g["mnum"]), int(g["mden"])))
        elif g["vulgar"] is not None:
            value = int(g["vwhole"] or 0) + _VULGAR[g["vulgar"]]
        elif g["num"] is not None:
            value = _dec(g["num"]) / _dec(g["den"])
        elif g["mant"] is not None:
            value = _dec(g["mant"]) * _power(Fraction(10), int(g["exp"] or g["exp10"]))
        elif g["base"] is not None:
            exponent = g["power"] or g["sup"].translate(_SUPERSCRIPTS)
            value = _power(_dec(g["base"]), int(exponent))
        else:
            value = _dec(g["plain"])
    except (ValueError, ZeroDivisionError):
        return None
    return -value if g["sign"] == "-" else value


def _words_value(words: str) -> int | None:
    """The value of an English number phrase ("forty-two", "one hundred and five"), or None when it is not
    one number ("two three")."""
    total, current, last, top_scale = 0, 0, "", math.inf
    for word in re.split(r"\s+and\s+|\s+|-", words.lower()):
        if word in _UNITS:
            if last == "unit" or (last == "ten" and not 1 <= _UNITS[word] <= 9):
                return None
            current, last = current + _UNITS[word], "unit"
        elif word in _TENS:
            if last in ("unit", "ten"):
                return None
            current, last = current + _TENS[word], "ten"
        elif word == "hundred":
            if last == "hundred" or current >= 100:
                return None
            current, last = (current or 1) * 100, "hundred"
        else:
            scale = _SCALES[word]
            if scale >= top_scale:
                return None
            total, current, last, top_scale = total + (current or 1) * scale, 0, "scale", scale
    return total + current


def _number_words(text: str) -> Fraction | None:
    phrases = [
        m
        for m in _WORD_PHRASE.finditer(text)
        # "the one on the left", "one of them": a pronoun, not a number.
        if not (
            m.group("words").lower() == "one"
            and not m.group("neg")
            and (_PRONOUN_BEFORE.search(text, 0, m.start()) or _PRONOUN_AFTER.match(text, m.end()))
        )
    ]
    if (
        not phrases
        or _WORD_AFTER.match(text, phrases[-1].end())  # "two thirds", "three point five"
        or _WORD_BEFORE.search(text, 0, phrases[-1].start())
    ):
        return None
    value = _words_value(phrases[-1].group("words"))
    if value is None:
        return None
    return Fraction(-value if phrases[-1].group("neg") else value)


def _to_float(value: Fraction) -> float | None:
    try:
        result = float(value)
    except OverflowError:
        return None
    return result if result or not value else None  # underflow to 0 would be a wrong number


def parse_number(text: str) -> float | None:
    """The value of the last number in a text, or None when there is none or it cannot be read for sure.

    Reads "1,234.5", "-3" (also with U+2212), "3/4", ".5", "1e3", "4.2 × 10^{-3}", "2^10", "10³",
    "\\frac{3}{4}", "1 1/2", "1½", "1 000" (thousands grouped by a space or thin space), "1.5 million" and,
    in a text without digits, English number words ("forty-two"). A last number that belongs to something
    else gives None rather than a wrong value: a malformed or foreign-style number ("1.2.3", "1,5",
    "3:45", "1.000.000"), a range ("3-5"), an expression ("5 + 3", "2\\sqrt{3}", "x^2") or a fraction in
    words ("two thirds").
    """
    text = _clean(text)
    matches = list(_NUMERIC.finditer(text))
    if not matches:
        value = _number_words(text)
        return None if value is None else _to_float(value)
    match = matches[-1]
    value = _match_value(match)
    if value is None:
        return None
    end = match.end()
    scales = _SCALE_AFTER.match(text, end)
    if scales:
        for word in scales.group().split():
            value *= _SCALES[word.lower()]
        end = scales.end()
    start = match.start()
    if (
        _GLUED_BEFORE.search(text, max(0, start - 60), start)
        or (match.group("sign") and _SIGN_GLUED.search(text, max(0, start - 60), start))
        or _GLUED_AFTER.match(text, end)
    ):
        return None
    return _to_float(value)


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
    """1.0 when the last number of the final answer equals the reference within tolerance, else 0.0 (also
    when that number is ambiguous; see :func:`parse_number`)."""

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
                    raise ValueError(
                        f"sample {index}: reference answer {answer!r} contains no number, or only one that "
                        "parse_number finds ambiguous"
                    )
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
