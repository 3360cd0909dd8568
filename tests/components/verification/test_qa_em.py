"""components.verification.qa_em: SQuAD normalisation, EM, F1 and the Search-R1 format rewards."""

from __future__ import annotations

import random

import pytest

from arborl.components.config import VerifyConfig
from arborl.components.verification.qa_em import (
    exact_match,
    f1_score,
    format_check,
    is_valid_think_sequence,
    normalize_answer,
    score_response,
)


@pytest.mark.parametrize(
    ("text", "normal"),
    [
        ("The Eiffel Tower!", "eiffel tower"),
        ("  a   cat, an apple;  the end ", "cat apple end"),
        ("Theatre anthem", "theatre anthem"),  # articles only as whole words
        ("U.S.A.", "usa"),
        ("", ""),
        ("A", ""),
        ("kai-ron", "kairon"),
        ("Tab\tand\nnewline", "tab and newline"),
    ],
)
def test_normalize_answer(text, normal):
    assert normalize_answer(text) == normal


def test_exact_match():
    assert exact_match("The Paris.", ["paris"])
    assert exact_match("paris", ["london", "Paris"])
    assert not exact_match("paris france", ["paris"])
    assert not exact_match("paris", [])
    assert exact_match("", ["the"])  # both normalise to the empty string


@pytest.mark.parametrize(
    ("pred", "golds", "f1"),
    [
        ("paris", ["paris"], 1.0),
        ("the paris", ["Paris!"], 1.0),
        ("paris france", ["paris"], 2 * 0.5 * 1.0 / 1.5),  # p = 1/2, r = 1
        ("kai ron lee", ["kai ron"], 2 * (2 / 3) * 1.0 / (2 / 3 + 1)),
        ("w x c d", ["c d e f g h"], 2 * 0.5 * (2 / 6) / (0.5 + 2 / 6)),
        ("a b c d", ["c d e f g h"], 2 * (2 / 3) * (2 / 6) / (2 / 3 + 2 / 6)),  # "a" is dropped first
        ("x x y", ["x y y"], 2 / 3),  # counts clip: common = {x: 1, y: 1}
        ("london", ["paris"], 0.0),
        ("", ["paris"], 0.0),
        ("paris", [""], 0.0),
        ("kai", ["london", "kai ron", "kai"], 1.0),  # best over ground truths
        ("kai", [], 0.0),
    ],
)
def test_f1_score(pred, golds, f1):
    assert f1_score(pred, golds) == pytest.approx(f1)


CFG = VerifyConfig()
SEARCH = "<search> kai ron born </search> <information> kai ron was born in paris . </information>"


@pytest.mark.parametrize(
    ("response", "reward", "correct"),
    [
        (f"{SEARCH} <answer> paris </answer>", 1.0, True),  # correct, valid format
        ("<search> q </search> <answer> paris </answer>", 0.8, True),  # correct, no <information>
        ("text <answer> Paris. </answer>", 0.8, True),  # correct, text outside tags
        (f"{SEARCH} <answer> london </answer>", 0.2, False),  # wrong, valid format
        ("<answer> london </answer> <answer> rome </answer>", 0.1, False),  # wrong, two answers
        ("<search> q </search> <answer> london </answer>", 0.1, False),  # wrong, bad format
        (SEARCH, 0.0, False),  # no answer
        ("", 0.0, False),
    ],
)
def test_score_response_five_cases(response, reward, correct):
    score = score_response(response, ["paris"], CFG)
    assert score.reward == pytest.approx(reward)
    assert score.correct is correct


def test_score_response_details():
    s = score_response(f"{SEARCH} <answer> paris france </answer>", ["paris"], CFG)
    assert s.answer == "paris france" and not s.correct and s.valid_format
    assert s.f1 == pytest.approx(2 / 3)
    assert s.reward == pytest.approx(0.2)
    none = score_response("nothing here", ["paris"], CFG)
    assert none.answer is None and none.f1 == 0.0 and not none.valid_format


def test_score_response_uses_the_configured_rewards():
    cfg = VerifyConfig(correct_format=5.0, correct_bad_format=4.0, wrong_format=3.0, wrong_bad_format=2.0,
                       no_answer=-1.0)
    assert score_response("<answer> paris </answer>", ["paris"], cfg).reward == 5.0
    assert score_response("x <answer> paris </answer>", ["paris"], cfg).reward == 4.0
    assert score_response("<answer> rome </answer>", ["paris"], cfg).reward == 3.0
    assert score_response("x <answer> rome </answer>", ["paris"], cfg).reward == 2.0
    assert score_response("x", ["paris"], cfg).reward == -1.0


def test_the_last_answer_is_scored():
    s = score_response("<answer> rome </answer> <answer> paris </answer>", ["paris"], CFG)
    assert s.answer == "paris" and s.correct and s.reward == pytest.approx(0.8)


def test_malformed_responses_never_raise():
    rng = random.Random(0)
    pieces = ["<search>", "</search>", "<information>", "</information>", "<answer>", "</answer>", "<answer",
              "</", "<", ">", "paris", "the", ".", "\n", "\x00", "é", "🙂", "<think>", "(", "[", "\\", "*", " "]
    for _ in range(500):
        text = "".join(rng.choice(pieces) for _ in range(rng.randint(0, 30)))
        s = score_response(text, ["paris"], CFG)
        assert s.reward in {0.0, 0.1, 0.2, 0.8, 1.0}
    deep = "<search>" * 1000 + "</search>" * 1000 + "<answer>" * 500
    assert score_response(deep, ["paris"], CFG).reward == 0.0
    assert score_response("<answer>" + "x " * 10000 + "</answer>", [""], CFG).reward == pytest.approx(0.2)


# --- the <think> requirement (Search-R1's variant: every model turn opens with <think>…</think>) ---------------

THINK_SEARCH = f"<think> who is kai ron ? </think> {SEARCH}"


@pytest.mark.parametrize(
    ("response", "valid"),
    [
        (f"{THINK_SEARCH} <think> so paris </think> <answer> paris </answer>", True),
        ("<think> i know it </think> <answer> paris </answer>", True),
        ("<think></think> <answer> paris </answer>", True),  # an empty think block still opens the turn
        (f"{SEARCH} <answer> paris </answer>", False),  # no <think> at all
        (f"{THINK_SEARCH} <answer> paris </answer>", False),  # the answer turn has no <think>
        ("<think> a </think> <think> b </think> <answer> paris </answer>", False),  # two thinks in a row
        ("<think> a </think> <answer> paris </answer> <think> more </think>", False),  # content after <answer>
        ("<think> a </think> x <answer> paris </answer>", False),  # text outside tags
        ("<think> a <search> q </search> </think> <answer> paris </answer>", False),  # nested tag
        ("<think> a </think>", False),  # no answer
        ("<think> a </think> <answer> </answer>", False),  # empty answer
    ],
)
def test_is_valid_think_sequence(response, valid):
    assert is_valid_think_sequence(response)[0] is valid


def test_require_think_decides_the_format_scores():
    think = VerifyConfig(require_think=True)
    with_think = "<think> easy </think> <answer> paris </answer>"
    without = "<answer> paris </answer>"
    assert score_response(with_think, ["paris"], think).reward == pytest.approx(1.0)
    assert score_response(without, ["paris"], think).reward == pytest.approx(0.8)  # correct, invalid format
    assert score_response(without, ["paris"], CFG).reward == pytest.approx(1.0)  # default: no <think> needed
    assert score_response(with_think, ["paris"], CFG).reward == pytest.approx(0.8)  # default: <think> is outside tags
    assert format_check(with_think, require_think=True) == (True, "ok")
    assert format_check(without, require_think=True) == (False, "<answer> without a preceding <think>")
