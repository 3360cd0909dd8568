"""One reward call and what it scores: the `Sample` (a response and its question's columns) and the call of a
built-in, a verl callable (per response) or a TRL callable (per batch), turned into an `Outcome`. A call that
raises, times out or returns no finite reward gives reward 0 with the error text, never an exception.
`scoring.py` decides where the calls run (a thread pool or worker processes) and what a stage does with errors.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from arborl.components.config import VerifyConfig
from arborl.components.verification.rewards import Builtin, Outcome, failed, judged, resolve_reward
from arborl.components.verification.timeouts import call_with_timeout
from arborl.components.verification.user_rewards import TRL_OPTIONAL, UserReward, call_trl, call_verl


@dataclass(frozen=True)
class Sample:
    """One response to score and its question: the prompt text, gold answers, data source, `extra_info`, the
    verl-style `reward_model` ({"style", "ground_truth"}) and other dataset columns for TRL callables."""

    response: str
    golds: list[str]
    data_source: str
    prompt: str = ""
    extra_info: dict[str, Any] = field(default_factory=dict)
    reward_model: dict[str, Any] | None = None
    columns: dict[str, Any] = field(default_factory=dict)

    @property
    def ground_truth(self) -> Any:
        """What a verl callable's `ground_truth` receives: `reward_model.ground_truth`, else {"target": golds}."""
        if self.reward_model is not None and "ground_truth" in self.reward_model:
            return self.reward_model["ground_truth"]
        return {"target": list(self.golds)}

    def reward_model_or_default(self) -> dict[str, Any]:
        return self.reward_model if self.reward_model is not None else {"style": "rule",
                                                                       "ground_truth": self.ground_truth}


def _json_column(row: Mapping[str, Any], key: str) -> Any:
    raw = row.get(key)
    if not isinstance(raw, str):
        return raw
    if not raw.strip():
        return None
    try:
        return json.loads(raw)
    except json.JSONDecodeError as exc:
        raise ValueError(f"prompt {row.get('prompt_id')!r}: column {key!r} is not valid JSON ({exc})") from None


def sample_from_prompt(row: Mapping[str, Any], response: str) -> Sample:
    """The Sample of `response` to a row of the prompts artifact: `extra_info` and, where present,
    `reward_model` and `messages` are JSON strings; `ability` and `messages` go to TRL callables as columns."""
    extra = _json_column(row, "extra_info")
    reward_model = _json_column(row, "reward_model")
    columns = {"ability": row.get("ability"), "messages": _json_column(row, "messages")}
    return Sample(response, list(row["ground_truth"]), row["data_source"], row.get("prompt") or "",
                  extra if isinstance(extra, dict) else {}, reward_model if isinstance(reward_model, dict) else None,
                  {k: v for k, v in columns.items() if v is not None})


def call_builtin(reward: Builtin, s: Sample, cfg: VerifyConfig, timeout_s: float | None) -> Outcome:
    try:
        if reward.timed:
            return call_with_timeout(reward.fn, timeout_s, reward.name, s.response, s.golds, cfg)
        return reward.fn(s.response, s.golds, cfg)
    except Exception as exc:  # a verifier bug costs that response its reward, never the caller
        return failed(s.response, f"{type(exc).__name__}: {exc}", cfg)


def _correct(reward: float, acc: bool | None, cfg: VerifyConfig) -> bool:
    return acc if acc is not None else reward >= cfg.correct_threshold


def _error_text(reward: UserReward, exc: Exception) -> str:
    """The failure text: our own checks name the callable already; an exception of its own gets its path."""
    text = f"{type(exc).__name__}: {exc}"
    return text if reward.path in str(exc) else f"{reward.path} raised {text}"


def _verl(reward: UserReward, s: Sample, cfg: VerifyConfig, timeout_s: float | None) -> Outcome:
    try:
        solution = s.prompt + s.response if cfg.reward_input == "prompt_and_response" else s.response
        score, acc, details = call_verl(reward, s.data_source, solution, s.ground_truth, s.extra_info, timeout_s)
        return judged(s.response, score, _correct(score, acc, cfg), cfg, details)
    except Exception as exc:
        return failed(s.response, _error_text(reward, exc), cfg)


def trl_batch(reward: UserReward, batch: list[Sample], cfg: VerifyConfig) -> list[Outcome]:
    columns: dict[str, list[Any]] = {
        "ground_truth": [list(s.golds) for s in batch],
        "data_source": [s.data_source for s in batch],
        "extra_info": [s.extra_info for s in batch],
        "reward_model": [s.reward_model_or_default() for s in batch],
    }
    for key in TRL_OPTIONAL:
        if all(key in s.columns for s in batch):
            columns[key] = [s.columns[key] for s in batch]
    try:
        values = call_trl(reward, [s.prompt for s in batch], [s.response for s in batch], columns, cfg.timeout_s)
    except Exception as exc:
        text = _error_text(reward, exc)
        return [failed(s.response, text, cfg) for s in batch]
    return [failed(s.response, err, cfg) if err is not None else judged(s.response, v, _correct(v, None, cfg), cfg)
            for s, (v, err) in zip(batch, values, strict=True)]


def score_one(spec: str, s: Sample, cfg: VerifyConfig, timeout_s: float | None) -> Outcome:
    """One per-response reward call of `spec` (a timed built-in or a verl callable), bounded by `timeout_s`
    (None: not bounded here; the caller kills the process past the limit)."""
    reward = resolve_reward(spec)
    if isinstance(reward, Builtin):
        if reward.setup is not None:
            reward.setup()
        return call_builtin(reward, s, cfg, timeout_s)
    return _verl(reward, s, cfg, timeout_s)
