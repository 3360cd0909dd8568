"""Where an in-process run's seconds go besides the model's compute, for `arborl bench iteration`.

`timed()` wraps, for the length of a run, the functions that save models, write Parquet and manifests, send
MLflow requests, update the Prefect UI and run a stage as a Prefect task, and adds up their wall seconds by
category. Only the outermost timed call counts (a dashboard update that logs to MLflow is a dashboard update),
and nothing is counted while the evaluate stage runs: the bench reports iterations without their evaluations.
"""

from __future__ import annotations

import contextlib
import functools
import time
from collections import defaultdict
from collections.abc import Iterator
from typing import Any

from arborl.components.artifacts import manifests, schemas, stage_keys
from arborl.components.training import lora, training_state

# category -> (owner, attribute) of every function it times; owners are looked up where the callers find them
INSIDE_STAGES = {
    "model_saves": [(lora, "save_trained"), (training_state, "write_training_state")],
    "artifact_writes": [(schemas, "write")],
    "manifests": [(manifests, "write_manifest"), (stage_keys, "file_digests")],
}


def _outside_stages() -> dict[str, list[tuple[Any, str]]]:
    from arborl.components.tracking.mlflow_run import Tracker
    from arborl.flows.dashboards import Dashboards

    dashboards = [name for name in vars(Dashboards) if not name.startswith("_") and callable(vars(Dashboards)[name])]
    return {
        "tracking": [(Tracker, name) for name in ("_send", "set_tags", "log_artifact", "log_figure", "log_dict",
                                                  "log_text")],
        "dashboards": [(Dashboards, name) for name in dashboards],
    }


class Timers:
    """Seconds per category (`seconds`); the same, by the stage that was running (`by_stage`); and `stage_calls`:
    the seconds of each stage's task run as the flow saw it, by stage name (its work plus Prefect's task run)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self.by_stage: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
        self.stage_calls: dict[str, float] = defaultdict(float)
        self._depth = 0
        self._stage: str | None = None
        self._evaluating = False

    def wrap(self, category: str, fn: Any) -> Any:
        @functools.wraps(fn)
        def timed_call(*args: Any, **kwargs: Any) -> Any:
            if self._depth or self._evaluating:
                return fn(*args, **kwargs)
            self._depth += 1
            started = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                took = time.perf_counter() - started
                self.seconds[category] += took
                if self._stage is not None:
                    self.by_stage[self._stage][category] += took
                self._depth -= 1

        return timed_call

    def wrap_stage_call(self, fn: Any) -> Any:
        @functools.wraps(fn)
        def stage_call(name: str, *args: Any, **kwargs: Any) -> Any:
            self._evaluating, self._stage = name == "evaluate", name
            started = time.perf_counter()
            try:
                return fn(name, *args, **kwargs)
            finally:
                if not self._evaluating:
                    self.stage_calls[name] += time.perf_counter() - started
                self._evaluating, self._stage = False, None

        return stage_call


@contextlib.contextmanager
def timed() -> Iterator[Timers]:
    """Time the categories of `INSIDE_STAGES` and the outside-stage ones while the block runs a pipeline."""
    from arborl.flows import pipeline

    timers = Timers()
    patched: list[tuple[Any, str, Any]] = []
    for category, targets in {**INSIDE_STAGES, **_outside_stages()}.items():
        for owner, name in targets:
            original = getattr(owner, name)
            patched.append((owner, name, original))
            setattr(owner, name, timers.wrap(category, original))
    patched.append((pipeline, "_stage", pipeline._stage))
    pipeline._stage = timers.wrap_stage_call(pipeline._stage)
    try:
        yield timers
    finally:
        for owner, name, original in reversed(patched):
            setattr(owner, name, original)
