"""Score responses with the configured rewards: `verify.reward` picks one per data source (`default` for the
rest); the verify stage and evaluation both call `score_samples`.

Built-ins run per response; verl callables per response and TRL callables once per batch (all the responses
that use them), each call bounded by `verify.timeout_s`. Per-response calls that may be slow (verl callables, the
timed `math`) run `verify.workers` at a time in a thread pool (or worker processes that are killed past the
limit, `verify.isolation=process`), and `verify.breaker` failures in a row stop the
scoring at once (`RewardErrors`). A call that raises, times out or returns something
that is not a finite reward gives those responses reward 0 with the error text, never an exception.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field, replace
from typing import Any

from arborl.components.config import VerifyConfig
from arborl.components.verification.isolated import score_in_processes
from arborl.components.verification.rewards import Builtin, Outcome, failed, judged, resolve_reward
from arborl.components.verification.timeouts import call_with_timeout
from arborl.components.verification.user_rewards import TRL_OPTIONAL, VERL, UserReward, call_trl, call_verl

log = logging.getLogger("arborl.verify")


class RewardErrors(ValueError):
    """More reward calls failed than `verify.max_error_fraction` allows: the stage fails rather than train or
    judge on zeros."""


def check_reward_errors(scored: Sequence[tuple[Any, str, str | None]], max_fraction: float, where: str) -> int:
    """(row, verifier, error or None) per scored response: raise `RewardErrors` when the errored fraction is above
    `max_fraction`, naming the callable(s), the count and the first error with its row; below it, one warning
    line when there are any. Returns the count."""
    failed_rows = [(row, verifier, error) for row, verifier, error in scored if error is not None]
    if not failed_rows:
        return 0
    row, verifier, error = failed_rows[0]
    by = sorted({v for _, v, _ in failed_rows})
    text = (f"{where}: {len(failed_rows)} of {len(scored)} reward calls failed ({', '.join(by)}); first, row "
            f"{row}: {error}")
    if len(failed_rows) / max(len(scored), 1) > max_fraction:
        raise RewardErrors(f"{text}. More than verify.max_error_fraction={max_fraction}: fix the reward, or raise "
                           "the threshold to accept that many zero rewards")
    log.warning("%s (within verify.max_error_fraction=%s: those responses score 0)", text, max_fraction)
    return len(failed_rows)


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


def reward_spec(cfg: VerifyConfig, data_source: str) -> str:
    """The reward spec `verify.reward` gives `data_source` (its own key, else `default`)."""
    return cfg.reward.get(data_source, cfg.reward["default"])


def _builtin(reward: Builtin, s: Sample, cfg: VerifyConfig, timeout_s: float | None) -> Outcome:
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


def _trl(reward: UserReward, batch: list[Sample], cfg: VerifyConfig) -> list[Outcome]:
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
        return _builtin(reward, s, cfg, timeout_s)
    return _verl(reward, s, cfg, timeout_s)


def _pooled(batch: list[Sample], cfg: VerifyConfig, spec: str) -> list[Outcome]:
    """`score_one` on every sample, `verify.workers` at a time, in order: in threads, or in worker processes with
    `verify.isolation=process`. The circuit breaker: `verify.breaker` calls failing in a row (in the order they
    finish) raise `RewardErrors` at once, naming the callable and the last error; calls still queued are not
    started."""
    if cfg.isolation == "process":
        return score_in_processes(batch, cfg, spec, lambda streak, last: _trip(streak, last, cfg, spec, len(batch)))

    def call(s: Sample) -> Outcome:
        return score_one(spec, s, cfg, cfg.timeout_s)

    if len(batch) <= 1 or cfg.workers == 1:
        outcomes = []
        streak = 0
        for s in batch:
            outcomes.append(call(s))
            streak = streak + 1 if outcomes[-1].error is not None else 0
            _trip(streak, outcomes[-1], cfg, spec, len(batch))
        return outcomes
    out: list[Outcome | None] = [None] * len(batch)
    streak = 0
    with ThreadPoolExecutor(max_workers=min(cfg.workers, len(batch)), thread_name_prefix="reward") as pool:
        futures = {pool.submit(call, s): i for i, s in enumerate(batch)}
        try:
            for future in as_completed(futures):
                outcome = out[futures[future]] = future.result()
                streak = streak + 1 if outcome.error is not None else 0
                _trip(streak, outcome, cfg, spec, len(batch))
        except RewardErrors:
            for future in futures:
                future.cancel()
            raise
    return [o for o in out if o is not None]


def _trip(streak: int, last: Outcome, cfg: VerifyConfig, spec: str, total: int) -> None:
    if cfg.breaker and streak >= cfg.breaker:
        raise RewardErrors(f"{spec}: {streak} reward calls in a row failed (verify.breaker={cfg.breaker}, of "
                           f"{total} responses); the last: {last.error}")


def score_samples(samples: Sequence[Sample], cfg: VerifyConfig) -> list[Outcome]:
    """One Outcome per sample, in order, `verifier` set to the spec that scored it (see the module docstring).

    Raises ValueError naming the `verify.reward` key only when a spec no longer resolves (a module that the
    config check imported has gone); every reward call's own failure is that response's `error`."""
    groups: dict[str, list[int]] = {}
    for i, s in enumerate(samples):
        groups.setdefault(reward_spec(cfg, s.data_source), []).append(i)
    out: list[Outcome | None] = [None] * len(samples)
    for spec, idx in groups.items():
        try:
            reward = resolve_reward(spec)
        except ValueError as exc:
            keys = ", ".join(f"verify.reward.{k}" for k, v in cfg.reward.items() if v == spec)
            raise ValueError(f"{keys}: {exc}") from None
        if isinstance(reward, Builtin) and not reward.timed:
            # plain Python on short strings: a pool would only add overhead
            if reward.setup is not None:
                reward.setup()
            scored = [_builtin(reward, samples[i], cfg, None) for i in idx]
        elif isinstance(reward, Builtin) or reward.style == VERL:
            scored = _pooled([samples[i] for i in idx], cfg, spec)
        else:
            scored = _trl(reward, [samples[i] for i in idx], cfg)
        for i, o in zip(idx, scored, strict=True):
            out[i] = replace(o, verifier=spec)
    return [o for o in out if o is not None]
