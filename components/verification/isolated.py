"""Reward calls in worker processes (`verify.isolation=process`), so that a call past `verify.timeout_s` is
killed with its worker instead of running on in the background.

A thread cannot be stopped: with `verify.isolation=thread` an overrunning call is abandoned and keeps a core busy
until it returns, if ever. Here each call runs in one of `verify.workers` processes of a pebble pool; past the
limit pebble kills that worker and starts a new one. A worker that dies (a segfault, `os._exit`) costs that
response its reward, like an exception. Workers start by fork-server (no copy of the parent's threads or GPU
state) and resolve the reward by its spec, so a user callable must be importable from its spec in a new process.
"""

from __future__ import annotations

import multiprocessing
import sys
from collections.abc import Callable
from concurrent.futures import TimeoutError as FutureTimeout
from concurrent.futures import as_completed
from typing import TYPE_CHECKING

from pebble import ProcessExpired, ProcessPool

from arborl.components.verification.calls import Sample, score_one
from arborl.components.verification.rewards import Outcome, failed

if TYPE_CHECKING:
    from arborl.components.config import VerifyConfig


def _work(spec: str, sample: Sample, cfg: VerifyConfig, path: list[str]) -> Outcome:
    # The fork server keeps the import path it started with; a spec resolves against the caller's, as in-process.
    sys.path[:] = path + [p for p in sys.path if p not in path]
    return score_one(spec, sample, cfg, None)


def score_in_processes(batch: list[Sample], cfg: VerifyConfig, spec: str,
                       trip: Callable[[int, Outcome], None]) -> list[Outcome]:
    """One Outcome per sample of `batch`, in order, each from `spec` called in a worker process and killed past
    `cfg.timeout_s`. `trip(streak, last)` is called after each result with the count of failures in a row (in the
    order they finish); when it raises, the pool is stopped (running calls killed, queued ones dropped) and the
    exception propagates."""
    out: list[Outcome | None] = [None] * len(batch)
    streak = 0
    context = multiprocessing.get_context("forkserver")
    # Workers fork from a server that has imported the scoring code once, instead of each importing it (~1 s).
    context.set_forkserver_preload(["arborl.components.verification.calls"])
    pool = ProcessPool(max_workers=min(cfg.workers, len(batch)), context=context)
    try:
        futures = {pool.schedule(_work, args=(spec, s, cfg, sys.path), timeout=cfg.timeout_s): i
                   for i, s in enumerate(batch)}
        for future in as_completed(futures):
            sample = batch[futures[future]]
            try:
                outcome = future.result()
            except FutureTimeout:
                outcome = failed(sample.response, f"{spec} did not return within {cfg.timeout_s:g} s "
                                 "(verify.timeout_s); its worker process was killed", cfg)
            except ProcessExpired as exc:
                outcome = failed(sample.response, f"{spec}: the worker process died ({exc}, exit code "
                                 f"{exc.exitcode})", cfg)
            except Exception as exc:  # the sample or the outcome did not pickle
                outcome = failed(sample.response, f"{spec}: {type(exc).__name__}: {exc}", cfg)
            out[futures[future]] = outcome
            streak = streak + 1 if outcome.error is not None else 0
            trip(streak, outcome)
    except BaseException:
        pool.stop()
        raise
    finally:
        pool.close()
        pool.join()
    return [o for o in out if o is not None]
