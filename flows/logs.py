"""Where the pipeline's log lines go: every `arborl.*` logger (stages, the flow) reaches the Prefect run's logs
while a flow runs, and the console; plus the one-line stage messages of the flow's stage wrapper.

Prefect's own loggers keep their level (`PREFECT_LOGGING_LEVEL`): the `arborl` records go to the Prefect API
through a handler of their own, attached for the flow run (`route_to_prefect`) and removed after it."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from typing import Any
from uuid import UUID

from prefect.logging.handlers import APILogHandler

from arborl.components.stages.contract import StageResult

ROOT_LOGGER = "arborl"
log = logging.getLogger("arborl.flows")

# the metrics a stage's finish line names, in this order (those present)
KEY_METRICS: dict[str, tuple[str, ...]] = {
    "prepare": ("train_prompts", "val_prompts", "test_prompts", "facts"),
    "warmstart": ("steps", "loss_first", "loss_final", "parameters"),
    "sample": ("trajectories", "generated_tokens", "tool_calls_per_prompt", "chain_equivalents_per_prompt"),
    "verify": ("reward_mean", "correct_mean", "leaves"),
    "label": ("preference_pairs", "advantage_abs_mean", "nonzero_advantage_frac"),
    "train": ("loss", "grad_norm", "clip_frac", "trainable_tokens"),
    "evaluate": ("test_em", "test_em_sampled", "val_em", "test_tool_calls"),
}


def task_run_label(stage: str, iteration: int | None = None, shard: int | None = None) -> str:
    """The task-run name of a stage: `<stage>-it<NNN>` within an iteration (0: the warm start's), `<stage>` for
    a one-off stage; a sample shard adds `-shard<i>`."""
    label = stage if iteration is None else f"{stage}-it{iteration:03d}"
    return label if shard is None else f"{label}-shard{shard}"


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def key_metrics(stage: str, metrics: dict[str, Any], most: int = 4) -> str:
    """`k=v, ...` of the stage's key metrics (or its first numeric ones)."""
    keys = [k for k in KEY_METRICS.get(stage, ()) if k in metrics]
    if not keys:
        keys = [k for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)]
    return ", ".join(f"{k}={_fmt(metrics[k])}" for k in keys[:most])


def stage_started(label: str, out: str) -> None:
    log.info("%s started → %s", label, out)


def stage_finished(label: str, result: StageResult, wall_seconds: float) -> None:
    """One INFO line: finished (stage seconds and key metrics) or skipped (a finished output was found)."""
    metrics = key_metrics(result.stage, result.metrics or {})
    if result.skipped:
        log.info("%s skipped in %.2f s: finished output found at %s (it took %.1f s; %s)", label, wall_seconds,
                 result.out, result.seconds, metrics or "no metrics")
    else:
        log.info("%s finished in %.1f s: %s", label, result.seconds, metrics or "no metrics")


class RunLogHandler(APILogHandler):
    """Prefect's API log handler, bound to one flow run: a record emitted outside any Prefect run context (a
    helper thread of the flow) is filed under that flow run instead of being dropped with a warning."""

    def __init__(self, flow_run_id: UUID | str, level: int = logging.NOTSET):
        super().__init__(level)
        self.flow_run_id = str(flow_run_id)

    def emit(self, record: logging.LogRecord) -> None:
        from prefect.context import FlowRunContext, TaskRunContext

        if getattr(record, "flow_run_id", None) is None and FlowRunContext.get() is None \
                and TaskRunContext.get() is None:
            record = logging.makeLogRecord({**record.__dict__, "flow_run_id": self.flow_run_id})
        super().emit(record)


@contextlib.contextmanager
def route_to_prefect(level: int = logging.INFO) -> Iterator[None]:
    """For the current flow run: `arborl.*` records at `level` and above go to its Prefect logs (task runs'
    records to their task run) and, unless the `arborl` logger has console handlers of its own (the CLI's), on
    to the root logger's console handler as before. Outside a flow run this does nothing."""
    from prefect.context import FlowRunContext

    context = FlowRunContext.get()
    logger = logging.getLogger(ROOT_LOGGER)
    if context is None or context.flow_run is None or any(isinstance(h, APILogHandler) for h in logger.handlers):
        yield
        return
    handler = RunLogHandler(context.flow_run.id)
    saved_level = logger.level
    if logger.level == logging.NOTSET or logger.level > level:
        logger.setLevel(level)
    logger.addHandler(handler)
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(saved_level)
        with contextlib.suppress(Exception):
            handler.flush()


@contextlib.contextmanager
def console_logging(console: Any, level: int = logging.INFO) -> Iterator[logging.Handler]:
    """For the block: show `arborl.*` records on a Rich console (the CLI's, so they print above its progress
    bars) instead of passing them on to the root logger's handlers; then restore the logger."""
    from rich.logging import RichHandler

    handler = RichHandler(console=console, show_path=False, markup=False, rich_tracebacks=False,
                          log_time_format="[%X]")
    handler.setLevel(level)
    logger = logging.getLogger(ROOT_LOGGER)
    saved = logger.level, logger.propagate
    logger.addHandler(handler)
    logger.setLevel(level)
    logger.propagate = False
    try:
        yield handler
    finally:
        logger.removeHandler(handler)
        logger.setLevel(saved[0])
        logger.propagate = saved[1]
