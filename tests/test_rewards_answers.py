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
    ],
)
def test_extract_choice_letter(text, expected):
    assert extract_choice_letter(text) == expected


def test_extract_respects_number_of_choices_and_choice_text():
    assert extract_choice_letter("E", num_choices=4) is None
    assert extract_choice_letter("E", num_choices=5) == "E"
    choices = ["apple", "red apple", "pear"]
    assert extract_choice_letter("I pick the red apple.", choices=choices) == "B"
    assert extract_choice_letter("It is a pear", choices=choices) == "C"
    assert extract_choice_letter("grapes", choices=choices) is None
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


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("42", 42.0),
        ("so 1,234.5 apples", 1234.5),
        ("-3 then 7", 7.0),
        ("3/4", 0.75),
        (".5", 0.5),
        ("none", None),
    ],
)
def test_parse_number(text, value):
    assert parse_number(text) == value


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
