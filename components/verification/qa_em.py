"""Search-R1 `qa_em_format` outcome verifier: exact match with format scores, SQuAD normalisation, F1."""

from __future__ import annotations

import re
import string
from collections import Counter
from dataclasses import dataclass

from arborl.components.config import VerifyConfig
from arborl.components.envs.protocol import extract_answer, is_valid_sequence

VERIFIER = "qa_em_format"


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


def score_response(response: str, ground_truths: list[str], cfg: VerifyConfig) -> Score:
    """Reward one agent response (model turns and observations, as one string).

    1.0 correct + valid format, 0.8 correct + bad format, 0.2 wrong + valid format, 0.1 answer present
    but wrong with bad format, 0 no answer (all configurable). Never raises on malformed text.
    """
    valid, reason = is_valid_sequence(response)
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
