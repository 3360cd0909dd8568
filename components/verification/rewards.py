"""Outcome rewards by name, and what a `verify.reward` spec resolves to.

A spec is a built-in's name or a user callable's import path (`user_rewards`). A built-in is a plain function
`(response, golds, settings) -> Outcome`: `response` is the agent's whole response (turns and observations),
`golds` the question's gold answers, `settings` the `verify` section (format scores, `require_think`). The
built-ins, in registration order, are listed by `describe_rewards`. `timed` built-ins run under
`verify.timeout_s`. This module imports no config, so the config can use it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from arborl.components.config import choices
from arborl.components.envs.protocol import extract_answer
from arborl.components.verification.math_reward import extract_math_answer, load_math_verify, math_equal
from arborl.components.verification.qa_em import (
    FormatScores,
    exact_match,
    f1_score,
    format_check,
    score_response,
)
from arborl.components.verification.user_rewards import UserReward, load_user_reward


@dataclass(frozen=True)
class Outcome:
    """One response's reward. `em`/`f1` are the QA metrics for the QA rewards; for the others em is `correct`
    (1/0) and f1 = em. `answer`/`valid_format` are the extracted answer and the Search-R1 format check (for
    evaluation rows), `details` goes to rewards.parquet as JSON, `error` is the failure text (reward 0), and
    `verifier` the spec that scored it."""

    reward: float
    correct: bool
    em: float
    f1: float
    answer: str | None
    valid_format: bool
    details: dict[str, Any] = field(default_factory=dict)
    error: str | None = None
    verifier: str = ""


BuiltinFn = Callable[[str, list[str], FormatScores], Outcome]


@dataclass(frozen=True)
class Builtin:
    """A registered built-in reward: `fn`, a one-line `help`, whether it runs under verify.timeout_s, and a
    `setup` run once, untimed, before a batch (e.g. a slow first import)."""

    name: str
    fn: BuiltinFn
    help: str
    timed: bool = False
    setup: Callable[[], object] | None = None


_REGISTRY: dict[str, Builtin] = {}


def register_reward(
    name: str, *, help: str, timed: bool = False, setup: Callable[[], object] | None = None  # noqa: A002
) -> Callable[[BuiltinFn], BuiltinFn]:
    """Decorator: register `fn(response, golds, settings) -> Outcome` as the built-in `name` (ValueError when
    the name is taken or looks like an import path)."""
    if name in _REGISTRY:
        raise ValueError(f"reward {name!r} is already registered")
    if not name or "." in name or ":" in name:
        raise ValueError(f"reward name {name!r} must be non-empty and hold no '.' or ':' (those mark import paths)")

    def add(fn: BuiltinFn) -> BuiltinFn:
        _REGISTRY[name] = Builtin(name, fn, help, timed, setup)
        return fn

    return add


def reward_names() -> tuple[str, ...]:
    """The built-in names, in registration order."""
    return tuple(_REGISTRY)


def describe_rewards() -> str:
    """One help line for the built-ins."""
    return "; ".join(f"{b.name} = {b.help}" for b in _REGISTRY.values())


def resolve_reward(spec: str) -> Builtin | UserReward:
    """The built-in named `spec`, or the user callable at import path `spec`; ValueError saying why not."""
    if spec in _REGISTRY:
        return _REGISTRY[spec]
    if "." in spec or ":" in spec:
        return load_user_reward(spec)
    raise ValueError(f"unknown reward {spec!r}: name a built-in ({', '.join(_REGISTRY)}) or a callable by "
                     "import path 'package.module:function'")


@choices.register_value("verify.reward")
def _check_reward_spec(spec: str) -> None:
    resolve_reward(spec)


def failed(response: str, error: str, settings: FormatScores) -> Outcome:
    """Reward 0 with `error`, for a response whose reward call failed."""
    try:
        answer, valid = extract_answer(response), format_check(response, settings.require_think)[0]
    except Exception:  # noqa: BLE001 - a failed outcome is built even from text the checks choke on
        answer, valid = None, False
    return Outcome(0.0, False, 0.0, 0.0, answer, valid, {}, error)


def judged(response: str, reward: float, correct: bool, settings: FormatScores,
           details: dict[str, Any] | None = None) -> Outcome:
    """The outcome of a reward that judges correctness only (math, user callables): em = correct, f1 = em."""
    valid = format_check(response, settings.require_think)[0]
    return Outcome(reward, correct, float(correct), float(correct), extract_answer(response), valid, details or {})


# --- the built-ins ----------------------------------------------------------------------------------------------


@register_reward("qa_em_format", help="Search-R1 exact match with format scores (verify.correct_format, ...)")
def qa_em_format(response: str, golds: list[str], settings: FormatScores) -> Outcome:
    s = score_response(response, golds, settings)
    details = {"answer": s.answer, "valid_format": s.valid_format, "format": s.format_reason}
    return Outcome(s.reward, s.correct, float(s.correct), s.f1, s.answer, s.valid_format, details)


def _qa(response: str, golds: list[str], settings: FormatScores, use_f1: bool) -> Outcome:
    answer = extract_answer(response)
    valid, reason = format_check(response, settings.require_think)
    em = answer is not None and exact_match(answer, golds)
    f1 = 0.0 if answer is None else f1_score(answer, golds)
    details = {"answer": answer, "valid_format": valid, "format": reason}
    return Outcome(f1 if use_f1 else float(em), em, float(em), f1, answer, valid, details)


@register_reward("qa_em", help="1 when the last <answer> matches a gold answer (SQuAD-normalised), else 0")
def qa_em(response: str, golds: list[str], settings: FormatScores) -> Outcome:
    return _qa(response, golds, settings, use_f1=False)


@register_reward("qa_f1", help="best token F1 of the last <answer> against the gold answers")
def qa_f1(response: str, golds: list[str], settings: FormatScores) -> Outcome:
    return _qa(response, golds, settings, use_f1=True)


@register_reward("math", timed=True, setup=load_math_verify,
                 help="1 when the last <answer> (else the last \\boxed{}) equals a gold answer by math-verify, else 0")
def math_verified(response: str, golds: list[str], settings: FormatScores) -> Outcome:
    answer, source = extract_math_answer(response)
    correct = answer is not None and math_equal(answer, golds)
    valid, reason = format_check(response, settings.require_think)
    details = {"answer": answer, "answer_from": source, "valid_format": valid, "format": reason}
    return Outcome(float(correct), correct, float(correct), float(correct), answer, valid, details)
