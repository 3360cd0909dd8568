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
