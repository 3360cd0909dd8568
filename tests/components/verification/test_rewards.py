"""components.verification.rewards: the built-in rewards on hand-made responses, the registry, spec resolution."""

from __future__ import annotations

import pytest

from arborl.components.config import VerifyConfig
from arborl.components.verification import rewards
from arborl.components.verification.qa_em import score_response
from arborl.components.verification.rewards import Builtin, describe_rewards, resolve_reward, reward_names
from arborl.components.verification.user_rewards import UserReward

CFG = VerifyConfig()
SEARCH = "<search> kai ron born </search> <information> kai ron was born in paris . </information>"


def builtin(name: str):
    reward = resolve_reward(name)
    assert isinstance(reward, Builtin)
    return reward.fn


def test_the_built_ins_in_order():
    assert reward_names()[:4] == ("qa_em_format", "qa_em", "qa_f1", "math")
    assert describe_rewards().startswith("qa_em_format = ")
    assert resolve_reward("math").timed and not resolve_reward("qa_em").timed


@pytest.mark.parametrize(
    "response",
    [f"{SEARCH} <answer> paris </answer>", "x <answer> Paris. </answer>", f"{SEARCH} <answer> london </answer>",
     "<answer> london </answer> <answer> rome </answer>", SEARCH, ""],
)
def test_qa_em_format_is_score_response(response):
    """The default reward gives exactly what score_response gives, with the same details."""
    o, s = builtin("qa_em_format")(response, ["paris"], CFG), score_response(response, ["paris"], CFG)
    assert (o.reward, o.correct, o.f1, o.answer, o.valid_format) == (s.reward, s.correct, s.f1, s.answer,
                                                                      s.valid_format)
    assert o.em == float(s.correct) and o.error is None
    assert o.details == {"answer": s.answer, "valid_format": s.valid_format, "format": s.format_reason}


@pytest.mark.parametrize(
    ("response", "em", "f1"),
    [
        (f"{SEARCH} <answer> paris </answer>", 1.0, 1.0),
        ("junk <answer> The Paris! </answer>", 1.0, 1.0),  # no format score: bad format still earns 1
        (f"{SEARCH} <answer> paris france </answer>", 0.0, 2 / 3),
        ("<answer> london </answer>", 0.0, 0.0),
        ("no answer at all", 0.0, 0.0),
    ],
)
def test_qa_em_and_qa_f1(response, em, f1):
    e, f = builtin("qa_em")(response, ["paris"], CFG), builtin("qa_f1")(response, ["paris"], CFG)
    assert e.reward == pytest.approx(em) and f.reward == pytest.approx(f1)
    for o in (e, f):  # both report the QA metrics, correct = exact match
        assert o.em == pytest.approx(em) and o.f1 == pytest.approx(f1) and o.correct is (em == 1.0)


def test_qa_rewards_follow_require_think_in_their_format_check():
    o = builtin("qa_em")("<answer> paris </answer>", ["paris"], VerifyConfig(require_think=True))
    assert o.reward == 1.0 and not o.valid_format
    assert o.details["format"] == "<answer> without a preceding <think>"


@pytest.mark.parametrize(
    ("response", "golds", "correct", "source"),
    [
        ("<think> half </think> <answer> \\frac{1}{2} </answer>", ["0.5"], True, "answer"),
        ("so the answer is \\boxed{0.5}", ["\\frac{1}{2}"], True, "boxed"),
        ("<answer> 3 </answer>", ["4"], False, "answer"),
        ("I do not know", ["4"], False, None),
    ],
)
def test_math(response, golds, correct, source):
    o = builtin("math")(response, golds, CFG)
    assert o.correct is correct and o.reward == o.em == o.f1 == float(correct)
    assert o.details["answer_from"] == source


def test_resolve_reward_tells_built_ins_paths_and_unknown_names(reward_fns):
    assert isinstance(resolve_reward("qa_f1"), Builtin)
    user = resolve_reward("user_reward_fns:trl_contains")
    assert isinstance(user, UserReward) and user.style == "trl"
    with pytest.raises(ValueError, match=r"unknown reward 'qa_exact'.*qa_em_format, qa_em, qa_f1, math"):
        resolve_reward("qa_exact")


def test_register_reward_refuses_taken_and_path_like_names():
    with pytest.raises(ValueError, match="already registered"):
        rewards.register_reward("qa_em", help="again")
    with pytest.raises(ValueError, match="import paths"):
        rewards.register_reward("my.reward", help="dotted")
