"""checked_reward, the registry, and several rewards with weights through TRL's own reward code."""

from __future__ import annotations

import math
import pathlib
import types

import numpy as np
import pytest
import torch

from dflow_trl.rewards import REWARD_REGISTRY, get_reward_function
from dflow_trl.rewards.combine import checked_reward, validate_rewards

from .helpers import assert_fresh_python_prints_ok


def exploding_reward(prompts, completions, **kwargs):
    raise ZeroDivisionError("boom")


def length_reward(completions, **kwargs):
    """TRL-style function that takes only the arguments it needs."""
    return [float(len(c)) for c in completions]


def test_checked_reward_names_function_and_batch():
    wrapped = checked_reward(exploding_reward)
    assert wrapped.__name__ == "exploding_reward"
    with pytest.raises(RuntimeError) as info:
        wrapped(
            prompts=["draw a red square", "p2", "p3", "p4"], completions=[1, 2, 3, 4], completion_ids=None
        )
    message = str(info.value)
    assert "reward function 'exploding_reward' failed on a batch of 4 samples" in message
    assert "'draw a red square'" in message and "'p4'" not in message  # only the first prompts are shown
    assert isinstance(info.value.__cause__, ZeroDivisionError)


def test_checked_reward_passes_keywords_through_like_trl():
    wrapped = checked_reward(length_reward)
    out = wrapped(prompts=["a", "b"], completions=["xyz", ""], completion_ids=[[1], [2]], trainer_state=None)
    assert out == [3.0, 0.0]


@pytest.mark.parametrize(
    ("values", "error", "match"),
    [
        ([1.0], ValueError, "returned 1 rewards for 2 completions"),
        ([1.0, math.nan], ValueError, "returned nan for sample 1"),
        ([math.inf, 1.0], ValueError, "returned inf for sample 0"),
        ([1.0, "0.5"], TypeError, "returned '0.5' .* for sample 1"),
        ([True, 1.0], TypeError, "for sample 0"),
        ({"a": 1}, TypeError, "returned a dict"),
    ],
)
def test_checked_reward_refuses_bad_outputs(values, error, match):
    def bad(prompts, completions, **kwargs):
        return values

    with pytest.raises(error, match=match):
        checked_reward(bad)(prompts=["p", "q"], completions=["x", "y"])


def test_validate_rewards_accepts_none_ints_and_arrays():
    assert validate_rewards([1, None, 2.5], 3, "r") == [1.0, None, 2.5]
    assert validate_rewards(np.array([0.5, 1.0]), 2, "r") == [0.5, 1.0]
    assert validate_rewards(torch.tensor([0.25]), 1, "r") == [0.25]


def test_checked_reward_keeps_class_scorer_name():
    reward = get_reward_function("exact_match")
    wrapped = checked_reward(reward)
    assert wrapped.__name__ == "exact_match"
    assert wrapped(prompts=["q"], completions=["Paris"], completion_ids=None, answer=["paris"]) == [1.0]


def test_registry_names_and_unknown_name():
    expected = {"pickscore", "clip_score", "aesthetic", "geneval", "ocr", "mc_letter", "exact_match",
                "numeric_match", "format", "remote", "placebo", "shapeworld_strict", "shapeworld_partial",
                "shapeworld_answer"}  # fmt: skip
    assert expected <= set(REWARD_REGISTRY)
    with pytest.raises(ValueError, match=r"unknown reward 'pickscor'; known rewards: \[.*'pickscore'"):
        get_reward_function("pickscor")
    with pytest.raises(ValueError, match="non-empty string"):
        get_reward_function("")


def test_registry_import_paths():
    assert get_reward_function("tests.test_rewards_combine:length_reward") is length_reward
    assert get_reward_function("tests.test_rewards_combine.length_reward") is length_reward
    fmt = get_reward_function("dflow_trl.rewards.answers:FormatReward", pattern="x+", name="xs")
    assert fmt(["p"], ["xxx"], None) == [1.0]
    with pytest.raises(ValueError, match="cannot import module"):
        get_reward_function("no_such_package.mod:f")
    with pytest.raises(ValueError, match="has no attribute"):
        get_reward_function("dflow_trl.rewards.answers:nope")


def test_registry_is_lazy_and_shapeworld_names_resolve():
    # A fresh interpreter shows that the registry imports no reward module until a reward is asked for. The
    # parent package is stubbed so that its trainer imports (heavy, not ours) do not run.
    code = (
        "import sys, types, pathlib; pkg = types.ModuleType('dflow_trl'); "
        f"pkg.__path__ = [{str(pathlib.Path(__file__).resolve().parents[1] / 'dflow_trl')!r}]; "
        "sys.modules['dflow_trl'] = pkg; "
        "import dflow_trl.rewards as r; "
        "loaded = [m for m in sys.modules if m.startswith('dflow_trl.rewards.')]; "
        "assert not loaded, loaded; "
        "f = r.get_reward_function('shapeworld_strict'); "
        "import dflow_trl.tasks.shapeworld.rewards as s; assert f is s.shapeworld_strict; "
        "assert 'dflow_trl.rewards.clip_scorers' not in sys.modules; print('ok')"
    )
    assert_fresh_python_prints_ok(code, timeout=120)


def test_several_weighted_rewards_through_trl_calculate_rewards():
    """TRL's own _calculate_rewards + its weighting line, with our (checked) rewards, a None and a failure."""
    from trl import GRPOTrainer
    from trl.trainer.utils import get_callable_name

    def not_applicable(prompts, completions, **kwargs):
        return [None for _ in completions]

    funcs = [
        checked_reward(get_reward_function("mc_letter")),
        checked_reward(get_reward_function("format", pattern=r".*\(\w\).*")),
        checked_reward(not_applicable),
    ]
    trainer = types.SimpleNamespace(
        accelerator=types.SimpleNamespace(device=torch.device("cpu"), is_main_process=True),
        reward_funcs=funcs,
        reward_processing_classes=[None] * len(funcs),
        reward_func_names=[get_callable_name(f) for f in funcs],
        state=types.SimpleNamespace(global_step=0),
        args=types.SimpleNamespace(report_to=[]),
        environments=None,
        _log_completion_extra=lambda column, values: None,
        _log_metric=lambda name, value: None,
    )
    trainer._prepare_inputs = lambda x: x
    inputs = [
        {"prompt": "q1", "answer": 1, "choices": ["x", "y"]},
        {"prompt": "q2", "answer": 0, "choices": ["x", "y"]},
    ]
    completions = ["The answer is (B).", "B"]
    per_func = GRPOTrainer._calculate_rewards(trainer, inputs, ["q1", "q2"], completions, [[1], [2]])
    assert trainer.reward_func_names == ["mc_letter", "format", "not_applicable"]
    assert per_func[:, :2].tolist() == [[1.0, 1.0], [0.0, 0.0]]
    assert torch.isnan(per_func[:, 2]).all()
    weights = torch.tensor([2.0, 0.5, 1.0])
    # The same weighting expression GRPOTrainer applies (NaN rewards drop out of the weighted sum).
    rewards = (per_func * weights.unsqueeze(0)).nansum(dim=1)
    assert rewards.tolist() == [2.5, 0.0]

    trainer.reward_funcs = [checked_reward(exploding_reward)]
    trainer.reward_processing_classes = [None]
    trainer.reward_func_names = ["exploding_reward"]
    with pytest.raises(RuntimeError, match="'exploding_reward' failed on a batch of 2 samples"):
        GRPOTrainer._calculate_rewards(trainer, inputs, ["q1", "q2"], completions, [[1], [2]])


def test_placebo_reward_ignores_the_completions_and_flips_a_fair_coin():
    from dflow_trl.rewards import checked_reward

    one, two = get_reward_function("placebo", seed=3), get_reward_function("placebo", seed=3)
    assert one.__name__ == "placebo"
    assert checked_reward(one).__name__ == "placebo"
    # The same seed gives the same flips whatever was generated: the reward cannot see the sample.
    a = one(prompts=["p"] * 4000, completions=["x"] * 4000)
    b = two(prompts=["q"] * 4000, completions=[str(i) for i in range(4000)])
    assert a == b and set(a) == {0.0, 1.0}
    # Bernoulli(1/2): mean within 5 standard errors (SE = 0.5 / sqrt(4000) ≈ 0.0079).
    assert abs(sum(a) / len(a) - 0.5) < 5 * 0.5 / 4000**0.5
    biased = get_reward_function("placebo", p=0.2, seed=0)(prompts=["p"] * 4000, completions=["x"] * 4000)
    assert abs(sum(biased) / 4000 - 0.2) < 5 * (0.2 * 0.8 / 4000) ** 0.5
    with pytest.raises(ValueError, match=r"p must lie in \(0, 1\)"):
        get_reward_function("placebo", p=1.0)
