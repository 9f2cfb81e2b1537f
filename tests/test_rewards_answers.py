"""Understanding rewards: multiple-choice letters, exact and numeric answers, format."""

from __future__ import annotations

import pytest

from dflow_trl.rewards import get_reward_function
from dflow_trl.rewards.answers import (
    extract_choice_letter,
    final_answer_text,
    normalize_answer,
    parse_number,
)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("B", "B"),
        ("b", "B"),
        ("B.", "B"),
        ("(C)", "C"),
        ("**D**", "D"),
        ("The answer is (B).", "B"),
        ("the answer is c.", "C"),
        ("Answer: d", "D"),
        ("ANSWER - A", "A"),
        ("The answer is option (d)", "D"),
        ("Option A is wrong; the answer is B", "B"),  # the answer statement beats an option mention
        ("The answer is B, not option A", "B"),
        ("A cat sits on a mat. The answer is D", "D"),  # article "A" is not an option
        ("B. Because the leaf is green.", "B"),
        ("(c) since plants need light", "C"),
        ("I think (D) fits best", "D"),
        ("Looking at the map, C is correct.", "C"),
        ("A cat is on the mat, so B", "B"),
        ("The answer is a bird", None),  # lowercase article, no option named
        ("nothing to see here", None),
        ("", None),
        ("(A) or (B), hard to say", None),  # ambiguous: two bracketed letters
        ("The answer is Z", None),  # not an option letter
        ("答案：B", "B"),
        ("答案是C", "C"),
        ("<answer>B</answer>", "B"),
        ("(C) 3.5", "C"),
        ("The correct option is B", "B"),
        ("I pick (c)", "C"),
        ("**Answer:** D", "D"),
        ("Options A, B, C or D? The answer is B.", "B"),  # an echoed question before the answer
        ("A. red\nB. blue\nAnswer: B", "B"),
    ],
)
def test_extract_choice_letter(text, expected):
    assert extract_choice_letter(text) == expected


@pytest.mark.parametrize(
    "text",
    [
        "A and B",
        "A or B",
        "b or c",
        "A/B",
        "B, C",
        "**A** or **B**",
        "The answer is B or C",
        "The answer is **B** or **C**",
        "The answer is (A) and/or (C)",
        "The answer is either B or C",
        "Answer: (A) or (B)",
        "答案：B或C",
        "I choose A and B",
        "(B) and C",
        "A. red B. blue C. green",  # the option list echoed back
        "a) red b) blue",
        "Not B.",
        "The answer is not B",
        "Not (B).",
        "Option C is wrong, so B",  # a mention of option C is not a choice of it; B and C stay ambiguous
    ],
)
def test_hedges_echoed_options_and_negations_pick_nothing(text):
    assert extract_choice_letter(text) is None


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("The answer is D? No wait, it's B.", "B"),
        ("The answer is D. Actually, B.", "B"),
        ("actually B", "B"),
        ("correction: B", "B"),
        ("C. On second thought, (A).", "A"),
        ("答案是D，不对，是B", "B"),
        ("Actually, the answer is C", "C"),
        ("Wait, let me check A and B again. The answer is C.", "C"),
        ("The answer is B. Actually, that was easy.", "B"),  # nothing named after the marker: B stands
        ("Answer: B (actually, it's a guess)", "B"),
        ("The answer is D? No wait, it's not D.", None),  # retracted without a replacement
        ("The answer is B. Wait, A and B could both work", None),  # corrected into a hedge
        ("The answer is not B but C", "C"),
        ("Not (B), so C", "C"),
        ("B. Not C.", "B"),
    ],
)
def test_self_corrections_and_ruled_out_options(text, expected):
    assert extract_choice_letter(text) == expected


def test_pronoun_i_is_not_option_i():
    assert extract_choice_letter("I think it's I", num_choices=10) == "I"
    assert extract_choice_letter("I think (J) fits", num_choices=10) == "J"
    assert extract_choice_letter("I am unsure", num_choices=10) is None


def test_extract_respects_number_of_choices_and_choice_text():
    assert extract_choice_letter("E", num_choices=4) is None
    assert extract_choice_letter("E", num_choices=5) == "E"
    choices = ["apple", "red apple", "pear"]
    assert extract_choice_letter("I pick the red apple.", choices=choices) == "B"
    assert extract_choice_letter("It is a pear", choices=choices) == "C"
    assert extract_choice_letter("grapes", choices=choices) is None
    assert extract_choice_letter("apple or pear", choices=choices) is None
    assert extract_choice_letter("Not the pear.", choices=choices) is None
    assert extract_choice_letter("Not the pear, the apple", choices=choices) == "A"
    assert extract_choice_letter("It is the pear. No wait, the apple.", choices=choices) == "A"
    with pytest.raises(ValueError, match="num_choices"):
        extract_choice_letter("A", num_choices=0)


def test_mc_letter_reward_scienceqa_format():
    reward = get_reward_function("mc_letter")
    assert reward.__name__ == "mc_letter"
    completions = ["The answer is (B).", "a", "I am not sure", "<answer>C</answer>", "It is the pear"]
    # ScienceQA stores the answer as a 0-based index into `choices`.
    out = reward(
        prompts=["q"] * 5,
        completions=completions,
        completion_ids=None,
        answer=[1, 1, 0, 2, 2],
        choices=[["x", "y"], ["x", "y"], ["x", "y"], ["x", "y", "z"], ["apple", "fig", "pear"]],
        trainer_state=None,
        log_extra=lambda *a: None,
    )
    assert out == [1.0, 0.0, 0.0, 1.0, 1.0]


def test_mc_letter_reward_pays_nothing_for_hedges():
    reward = get_reward_function("mc_letter", choices_column=None)
    completions = ["A or B", "The answer is B or C", "Answer: (A) or (B)", "Not B.", "A. x B. y", "B"]
    assert reward(["q"] * 6, completions, None, answer=["B"] * 6) == [0.0] * 5 + [1.0]
    corrected = ["The answer is D? No wait, it's B.", "<answer>D? Actually B</answer>"]
    assert reward(["q"] * 2, corrected, None, answer=["B", "B"]) == [1.0, 1.0]


def test_mc_letter_reward_letter_answers_and_chat_completions():
    reward = get_reward_function("mc_letter", choices_column=None)
    completions = [[{"role": "assistant", "content": "Answer: (d)"}], "B"]
    assert reward(["q", "q"], completions, None, answer=["D", "(C)"]) == [1.0, 0.0]


def test_mc_letter_reward_errors_are_clear():
    reward = get_reward_function("mc_letter")
    with pytest.raises(KeyError, match="needs a dataset column 'answer'"):
        reward(["q"], ["A"], None, solution=["A"])
    with pytest.raises(ValueError, match="out of range"):
        reward(["q"], ["A"], None, answer=[3], choices=[["x", "y"]])
    with pytest.raises(ValueError, match="cannot read the correct option"):
        reward(["q"], ["A"], None, answer=["something long and unrelated"])
    with pytest.raises(ValueError, match="1 entries for 2"):
        reward(["q", "q"], ["A", "B"], None, answer=["A"])


def test_normalize_and_exact_match():
    assert normalize_answer("  The Eiffel-Tower! ") == "eiffel tower"
    reward = get_reward_function("exact_match")
    out = reward(
        ["q"] * 4,
        ["Paris.", "<think>hmm</think><answer>the Paris</answer>", "Lyon", "NEW  york"],
        None,
        answer=["paris", "Paris", ["Paris", "Marseille"], ["New York", "NYC"]],
    )
    assert out == [1.0, 1.0, 0.0, 1.0]


# Each answer string with its value, or None where reading a number would risk a wrong one.
NUMBER_CASES = [
    # plain, signed, grouped
    ("42", 42),
    ("so 1,234.5 apples", 1234.5),
    ("-3 then 7", 7),
    (".5", 0.5),
    ("-.5", -0.5),
    ("+5", 5),
    ("0.5", 0.5),
    ("none", None),
    ("", None),
    ("1,000,000", 1_000_000),
    ("2,500.00", 2500),
    ("$1,000", 1000),
    ("\\$5", 5),
    ("50%", 50),
    ("50\\%", 50),
    ("90°", 90),
    ("90^\\circ", 90),
    ("#### 72", 72),
    ("\\boxed{7}", 7),
    ("**42**", 42),
    ("The answer is **42**.", 42),
    ("3.14159...", 3.14159),
    ("5th", 5),
    ("5-year-old", 5),
    ("5 seconds", 5),
    ("1, 2, 3", 3),
    ("x = -3", -3),
    ("is -3", -3),
    ("(-5)", -5),
    ("Answer - 42", 42),
    ("x -> 5", 5),
    ("3 * 4 = 12", 12),
    ("5+3=8", 8),
    ("\\sqrt{16} = 4", 4),
    # other minus signs and digits
    ("\u22122", -2),
    ("\u20132", -2),
    ("\u0664\u0662", 42),
    ("\uff14\uff12", 42),
    # thousands grouped by spaces: only in groups of three
    ("1 000", 1000),
    ("1\u2009000", 1000),
    ("1\u202f000", 1000),
    ("1\u00a0000", 1000),
    ("12 345 678", 12_345_678),
    ("Answer: 2 500", 2500),
    ("1 000.5", 1000.5),
    ("1\\,000", 1000),
    ("1{,}000", 1000),
    ("1 0000", None),
    ("1\u20090000", None),
    ("1 2 3", None),
    # scientific notation and powers
    ("1e3", 1000),
    ("4.2e-3", 0.0042),
    ("4.2E+3", 4200),
    ("1.5e3", 1500),
    ("4.2 \\times 10^{-3}", 0.0042),
    ("4.2 × 10^-3", 0.0042),
    ("3x10^5", 300_000),
    ("6.02 \\cdot 10^{23}", 6.02e23),
    ("10^{-3}", 0.001),
    ("2^10", 1024),
    ("2^{10}", 1024),
    ("-2^2", -4),
    ("10³", 1000),
    ("2¹⁰", 1024),
    ("10⁻³", 0.001),
    ("1e500", None),
    ("1e-500", None),
    ("2^100000", None),
    # fractions
    ("3/4", 0.75),
    ("-3/4", -0.75),
    ("\\frac{3}{4}", 0.75),
    ("\\dfrac{3}{4}", 0.75),
    ("\\tfrac{1}{8}", 0.125),
    ("-\\frac{3}{4}", -0.75),
    ("\\frac{-3}{4}", -0.75),
    ("\\frac{ 3 }{ 4 }", 0.75),
    ("1 1/2", 1.5),
    ("1 1/2 cups", 1.5),
    ("10 3/4", 10.75),
    ("1\\frac{1}{2}", 1.5),
    ("½", 0.5),
    ("1½", 1.5),
    ("1 ½", 1.5),
    ("¾ cup", 0.75),
    ("1\u20442", 0.5),
    ("3/0", None),
    ("\\frac{1}{0}", None),
    ("2 3/2", None),
    ("2\\frac{3}{2}", None),
    ("\\frac12", None),
    ("\\frac{1}{\\sqrt{2}}", None),
    ("1/2/3", None),
    ("3 / 4", None),
    # scale words
    ("1.5 million", 1_500_000),
    ("3 hundred", 300),
    ("2 thousandths", None),
    ("2 thirds", None),
    ("2 dozen", None),
    # number words, in a text without digits
    ("fifty", 50),
    ("Fifty-Five", 55),
    ("twelve", 12),
    ("forty-two", 42),
    ("one", 1),
    ("zero", 0),
    ("seven hundred", 700),
    ("nineteen hundred", 1900),
    ("one hundred and five", 105),
    ("two thousand and twenty-four", 2024),
    ("a thousand", 1000),
    ("minus five", -5),
    ("negative seven", -7),
    ("the answer is three.", 3),
    ("two thirds", None),
    ("three point five", None),
    ("one and a half", None),
    ("five over two", None),
    ("from one to five", None),
    ("two three", None),
    ("twenty-first", None),
    ("the one on the left", None),
    ("no one knows", None),
    # malformed, foreign-style or ambiguous numbers
    ("1,5", None),
    ("3,5", None),
    ("1,23", None),
    ("12,3456", None),
    ("1,00,000", None),
    ("1.2.3", None),
    ("1.000.000", None),
    ("1.000,50", None),
    ("3:45", None),
    ("5'10", None),
    ("1_000", None),
    ("12/25/2023", None),
    ("2023-01-05", None),
    # ranges, expressions and functions
    ("3-5", None),
    ("1\u20132", None),
    ("COVID-19", None),
    ("5 -3", None),
    ("5 + 3", None),
    ("2 + x", None),
    ("3/x", None),
    ("x^2", None),
    ("x²", None),
    ("x_1", None),
    ("±3", None),
    ("x > 3", None),
    ("2\\sqrt{3}", None),
    ("\\sqrt[3]{8}", None),
    ("2\\pi", None),
    ("2π", None),
    ("\\log_2 8", None),
    ("log(8)", None),
]


def test_number_table_is_large():
    assert len(NUMBER_CASES) >= 100
    assert len({text for text, _ in NUMBER_CASES}) == len(NUMBER_CASES)


@pytest.mark.parametrize(("text", "value"), NUMBER_CASES)
def test_parse_number(text, value):
    parsed = parse_number(text)
    if value is None:
        assert parsed is None
    else:
        assert parsed == pytest.approx(value, rel=1e-12)


def test_numeric_match():
    reward = get_reward_function("numeric_match")
    completions = [
        "The total is 1,000.",
        "\\boxed{0.5} and then 7",
        "about 3.14159",
        "no idea",
        "<answer>-2</answer>",
    ]
    answers = ["#### 1000", 0.5, 3.1416, 5, "-2"]
    assert reward(["q"] * 5, completions, None, answer=answers) == [1.0, 1.0, 0.0, 0.0, 1.0]
    loose = get_reward_function("numeric_match", rel_tol=1e-3)
    assert loose(["q"], ["about 3.14159"], None, answer=[3.1416]) == [1.0]
    with pytest.raises(ValueError, match="contains no number"):
        reward(["q"], ["1"], None, answer=["unknown"])
    read = [
        "\\boxed{1e3}",
        "<answer>\u22122</answer>",
        "\\frac{3}{4}",
        "1 000",
        "2^10",
        "fifty",
        "3-5",
        "2 \\sqrt{2}",
    ]
    answers = [1000, -2, 0.75, 1000, 1024, 50, 5, 2]
    assert reward(["q"] * 8, read, None, answer=answers) == [1.0] * 6 + [0.0, 0.0]


def test_final_answer_text():
    assert final_answer_text("x <answer>a</answer> y <answer>b</answer>") == "b"
    assert final_answer_text("so \\boxed{\\frac{1}{2}}") == "\\frac{1}{2}"
    assert final_answer_text("plain") == "plain"


def test_format_reward():
    reward = get_reward_function("format")
    good = "<think>because</think>\n<answer>B</answer>"
    assert reward(["q"] * 3, [good, "<answer>B</answer>", good + " trailing"], None) == [1.0, 0.0, 0.0]
    custom = get_reward_function("format", pattern=r"Answer: [A-D]", name="answer_format")
    assert custom.__name__ == "answer_format"
    assert custom(["q", "q"], ["Answer: C", "Answer: C!"], None) == [1.0, 0.0]
    with pytest.raises(ValueError, match="not a valid regular expression"):
        get_reward_function("format", pattern="(")
    with pytest.raises(TypeError, match="text completion"):
        reward(["q"], [object()], None)
