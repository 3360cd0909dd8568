"""Search-R1 `qa_em_format` outcome verifier: exact match with format scores, SQuAD normalisation, F1.

The format check is Search-R1's structure check (`is_valid_sequence`); with `require_think` it is Search-R1's
variant where every model turn opens with `<think>…</think>` (`is_valid_think_sequence`). This module imports no
config (the config validates rewards through `rewards`): `score_response` takes any object with the format scores.
"""

from __future__ import annotations

import re
import string
from collections import Counter
from dataclasses import dataclass
from typing import Protocol

from arborl.components.envs.protocol import TAGS, extract_answer, is_valid_sequence

VERIFIER = "qa_em_format"
THINK_OPEN, THINK_CLOSE = "<think>", "</think>"


class FormatScores(Protocol):
    """The rewards of the five `qa_em_format` cases and the `<think>` rule (`verify.*`)."""

    correct_format: float
    correct_bad_format: float
    wrong_format: float
    wrong_bad_format: float
    no_answer: float
    require_think: bool


def normalize_answer(text: str) -> str:
    """SQuAD normalisation: lower-case, drop punctuation and articles, collapse whitespace."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def exact_match(prediction: str, ground_truths: list[str]) -> bool:
    pred = normalize_answer(prediction)
    return any(pred == normalize_answer(g) for g in ground_truths)


def f1_score(prediction: str, ground_truths: list[str]) -> float:
    """Best token-level F1 of the prediction against any ground truth (SQuAD)."""
    best = 0.0
    pred = normalize_answer(prediction).split()
    for g in ground_truths:
        gold = normalize_answer(g).split()
        common = Counter(pred) & Counter(gold)
        same = sum(common.values())
        if same == 0:
            continue
        precision, recall = same / len(pred), same / len(gold)
        best = max(best, 2 * precision * recall / (precision + recall))
    return best


@dataclass
class Score:
    reward: float
    correct: bool
    f1: float
    answer: str | None
    valid_format: bool
    format_reason: str


_THINK_BLOCK = re.compile(r"<(think|search|information|answer)>(.*?)</\1>", re.S)
_THINK_TAGS = (*TAGS, THINK_OPEN, THINK_CLOSE)


def is_valid_think_sequence(solution: str) -> tuple[bool, str]:
    """Search-R1's structure check with its `<think>` rule: every model turn opens with `<think>…</think>`.

    Valid means: a think block, then either `<search>…</search> <information>…</information>` followed by the
    next turn's think block, or one `<answer>…</answer>` that ends the response; search and answer blocks are
    non-empty, nothing stands outside the blocks and no block holds another tag.
    """
    pos, state = 0, "start"  # start → think → search → information → think → … → answer
    text = solution.strip()
    for m in _THINK_BLOCK.finditer(text):
        between = text[pos : m.start()].strip()
        if between:
            return False, f"text outside tags: {between[:40]!r}"
        tag, body = m.group(1), m.group(2).strip()
        if any(t in body for t in _THINK_TAGS):
            return False, f"nested tag in <{tag}>"
        if state == "answer":
            return False, "content after <answer>"
        if tag == "think":
            if state not in ("start", "information"):
                return False, "<think> must open a turn (at the start or after <information>)"
        elif tag == "information":
            if state != "search":
                return False, "<information> without a preceding <search>"
        else:
            if state != "think":
                return False, f"<{tag}> without a preceding <think>"
            if not body:
                return False, f"empty <{tag}>"
        state = tag
        pos = m.end()
    if text[pos:].strip():
        return False, f"trailing text: {text[pos:].strip()[:40]!r}"
    if state != "answer":
        return False, "no <answer>"
    return True, "ok"


def format_check(response: str, require_think: bool = False) -> tuple[bool, str]:
    """(valid, reason) of the Search-R1 structure check, with the `<think>` rule when `require_think`."""
    return is_valid_think_sequence(response) if require_think else is_valid_sequence(response)


def score_response(response: str, ground_truths: list[str], cfg: FormatScores) -> Score:
    """Reward one agent response (model turns and observations, as one string).

    1.0 correct + valid format, 0.8 correct + bad format, 0.2 wrong + valid format, 0.1 answer present
    but wrong with bad format, 0 no answer (all configurable). Never raises on malformed text.
    """
    valid, reason = format_check(response, cfg.require_think)
    answer = extract_answer(response)
    if answer is None:
        return Score(cfg.no_answer, False, 0.0, None, valid, reason)
    correct = exact_match(answer, ground_truths)
    f1 = f1_score(answer, ground_truths)
    if correct:
        reward = cfg.correct_format if valid else cfg.correct_bad_format
    else:
        reward = cfg.wrong_format if valid else cfg.wrong_bad_format
    return Score(reward, correct, f1, answer, valid, reason)
