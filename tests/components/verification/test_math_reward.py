"""components.verification.math_reward: the final answer (last <answer>, else last \\boxed{}) checked by math-verify."""

from __future__ import annotations

import pytest

from arborl.components.verification.math_reward import extract_math_answer, last_boxed, math_equal
from arborl.components.verification.timeouts import call_with_timeout


@pytest.mark.parametrize(
    ("text", "boxed"),
    [
        ("so \\boxed{42}.", "42"),
        ("\\boxed{1} then \\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),  # the last one, nested braces kept
        ("\\fbox{7}", "7"),
        ("\\boxed{unclosed", None),
        ("no box here", None),
        ("\\boxed 3", None),  # the brace-less form is not read
    ],
)
def test_last_boxed(text, boxed):
    assert last_boxed(text) == boxed


@pytest.mark.parametrize(
    ("response", "expected"),
    [
        ("<think> 1+1 </think> <answer> 2 </answer>", ("2", "answer")),
        ("<answer> 3 </answer> ... \\boxed{4}", ("3", "answer")),  # an <answer> block wins over a box
        ("the result is \\boxed{\\sqrt{2}}", ("\\sqrt{2}", "boxed")),
        ("no final answer", (None, None)),
    ],
)
def test_extract_math_answer(response, expected):
    assert extract_math_answer(response) == expected


@pytest.mark.parametrize(
    ("answer", "golds", "equal"),
    [
        ("0.5", ["\\frac{1}{2}"], True),
        ("\\frac12", ["0.5"], True),
        ("1/2", ["\\frac{1}{2}"], True),
        ("72", ["72"], True),
        ("1,000", ["1000"], True),
        ("2x+x^2", ["x^2+2x"], True),
        ("$\\sqrt{2}$", ["\\sqrt{2}"], True),  # delimiters in the answer are read as they are
        ("\\boxed{3}", ["3"], True),
        ("0.4", ["\\frac{1}{2}"], False),
        ("seventy-two", ["72"], False),
        ("", ["1"], False),
        ("5", ["4", "5"], True),  # any gold answer
        ("5", [], False),
    ],
)
def test_math_equal(answer, golds, equal):
    assert math_equal(answer, golds) is equal


def test_math_equal_works_off_the_main_thread():
    """math-verify's SIGALRM timeouts are off, so the check runs in a worker thread (stages may run in one)."""
    assert call_with_timeout(math_equal, 30.0, "math", "\\frac{3}{4}", ["0.75"]) is True


def test_gsm8k_final_answers_after_hashes():
    """GSM8K writes its final answer after `####`, in the worked solution that is its gold and in responses that
    follow it: both are read by what follows the last `####`."""
    from arborl.components.config import VerifyConfig
    from arborl.components.verification.scoring import Sample, score_samples

    assert extract_math_answer("48/2 = 24 clips in May\n#### 72") == ("72", "hashes")
    assert extract_math_answer("no final answer here") == (None, None)
    gold = "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\nNatalia sold 48+24 = <<48+24=72>>72 clips.\n#### 72"
    assert math_equal("72", [gold]) and not math_equal("71", [gold])
    out = score_samples([Sample("so 72 in all\n#### 72", [gold], "gsm8k"), Sample("#### 70", [gold], "gsm8k")],
                        VerifyConfig(reward={"default": "math"}))
    assert [o.reward for o in out] == [1.0, 0.0] and out[0].details["answer_from"] == "hashes"
