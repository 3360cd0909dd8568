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

import logging
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import replace
from typing import Any

from arborl.components.config import VerifyConfig
from arborl.components.verification.calls import Sample, call_builtin, score_one, trl_batch
from arborl.components.verification.isolated import score_in_processes
from arborl.components.verification.rewards import Builtin, Outcome, resolve_reward
from arborl.components.verification.user_rewards import VERL

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


def reward_spec(cfg: VerifyConfig, data_source: str) -> str:
    """The reward spec `verify.reward` gives `data_source` (its own key, else `default`)."""
    return cfg.reward.get(data_source, cfg.reward["default"])


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
            scored = [call_builtin(reward, samples[i], cfg, None) for i in idx]
        elif isinstance(reward, Builtin) or reward.style == VERL:
            scored = _pooled([samples[i] for i in idx], cfg, spec)
        else:
            scored = trl_batch(reward, [samples[i] for i in idx], cfg)
        for i, o in zip(idx, scored, strict=True):
            out[i] = replace(o, verifier=spec)
    return [o for o in out if o is not None]
