"""The `math` reward: the response's final answer checked against the gold answers with `math-verify`.

The answer is the content of the last `<answer>…</answer>` block, else of the last `\\boxed{…}`, else what follows
GSM8K's last `####`; a gold written as GSM8K's worked solution counts by what follows its `####`. Gold and
answer are parsed by math-verify (LaTeX and plain expressions, so `\\frac{1}{2}`, `1/2` and `0.5` agree) and
compared symbolically and numerically. math-verify's own timeouts use SIGALRM, which only works in the main
thread, so they are switched off here: the caller bounds the call (`timeouts.call_with_timeout`).
"""

from __future__ import annotations

import logging
from typing import Any

from arborl.components.envs.protocol import extract_answer

_BOXED = ("\\boxed", "\\fbox")
_LATEX_MARKERS = ("$", "\\(", "\\[", "\\boxed", "\\fbox")


class _NoTimeoutWarning(logging.Filter):
    """Drop math-verify's warning that its timeouts are off: they are, on purpose (see the module docstring)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Timeout is disabled")


for _name in ("math_verify.parser", "math_verify.grader"):
    logging.getLogger(_name).addFilter(_NoTimeoutWarning())


def last_boxed(text: str) -> str | None:
    """The content of the last `\\boxed{…}` (or `\\fbox{…}`) in `text`, braces balanced; None when there is none
    or it is not closed."""
    start = max(text.rfind(marker) for marker in _BOXED)
    if start < 0:
        return None
    i = text.find("{", start)
    if i < 0 or text[start:i].strip() not in _BOXED:
        return None
    depth = 0
    for j in range(i, len(text)):
        if text[j] == "{":
            depth += 1
        elif text[j] == "}":
            depth -= 1
            if depth == 0:
                return text[i + 1 : j].strip()
    return None


def final_hashes(text: str) -> str | None:
    """GSM8K's final answer: what follows the last `####` (up to the line's end), or None when there is none."""
    if "####" not in text:
        return None
    tail = text.rsplit("####", 1)[1].strip().splitlines()
    answer = tail[0].strip().replace(",", "") if tail else ""
    return answer or None


def extract_math_answer(response: str) -> tuple[str | None, str | None]:
    """(answer, where it came from: "answer", "boxed" or "hashes"), or (None, None) when the response has none."""
    answer = extract_answer(response)
    if answer is not None:
        return answer, "answer"
    boxed = last_boxed(response)
    if boxed is not None:
        return boxed, "boxed"
    hashes = final_hashes(response)
    return (hashes, "hashes") if hashes is not None else (None, None)


def load_math_verify() -> None:
    """Import math-verify (and sympy) now, so that the first timed check does not pay for the import."""
    import math_verify  # noqa: F401


def parse_math(text: str) -> list[Any]:
    """math-verify's parse of `text`; text without a LaTeX delimiter or box is read as inline math."""
    from math_verify import parse

    wrapped = text if any(m in text for m in _LATEX_MARKERS) else f"${text}$"
    return parse(wrapped, parsing_timeout=None)


def math_equal(answer: str, golds: list[str]) -> bool:
    """True when `answer` is mathematically equal to any of `golds` (math-verify, gold first)."""
    from math_verify import verify

    parsed = parse_math(answer)
    if not parsed:
        return False
    golds = [final_hashes(g) or g for g in golds]  # a GSM8K gold is its worked solution ending in `#### 72`
    return any(verify(gold, parsed, timeout_seconds=None) for gold in map(parse_math, golds) if gold)
