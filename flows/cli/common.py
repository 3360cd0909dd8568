"""What the commands share: the console, the config options, config loading, the preflight, locks, Prefect set-up."""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.markup import escape

from arborl.flows.cli.errors import LOCKED_EXIT, err_console

console = Console(log_path=False)

ConfigOpt = typer.Option(None, "--config", "-c", help="YAML config (default: configs/tiny.yaml).")
OverridesArg = typer.Argument(None, help="Overrides such as run.iterations=5 sampling.expansion_rounds=0.")


def _prefect_env() -> None:
    """Prefect defaults for an offline machine: temporary local server unless an API URL is set, no telemetry."""
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("DO_NOT_TRACK", "1")
    if os.environ.get("PREFECT_API_URL") == "":
        del os.environ["PREFECT_API_URL"]  # an empty URL breaks the events client; unset means "start one"
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "90")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # registry downloads: no bars
    # the transformers flavor warns about hub model cards and licences a local model cannot have
    logging.getLogger("mlflow.transformers").setLevel(logging.ERROR)
    logging.getLogger("mlflow.system_metrics").setLevel(logging.WARNING)  # its start/stop notices


def _load(config: Optional[Path | str], overrides: Optional[list[str]]):
    from arborl.components.config import ConfigError, load_config

    try:
        return load_config(config, overrides or [])
    except ConfigError as exc:
        err_console.print(f"[red]config error:[/red] {escape(str(exc))}", soft_wrap=True)
        raise typer.Exit(2) from None


@contextlib.contextmanager
def _locked(root: str, command: str):
    """Hold the writer's lock of `root` (`<root>/_lock.json`, components/artifacts/run_lock.py) while the command runs;
    when another live writer holds it, exit at once (code 3) with a one-line message naming the holder. A local
    `root` that exists but is no directory is not locked: nothing can be written there, and the command says so."""
    from arborl.components.artifacts import storage
    from arborl.components.artifacts.run_lock import LockHeld, RunLock

    local = Path(storage.filesystem(root)[1]) if storage.is_local(root) else None
    if local is not None and local.exists() and not local.is_dir():
        yield None
        return
    try:
        lock = RunLock(root, command).acquire()
    except LockHeld as exc:
        err_console.print(f"[red]locked:[/red] {escape(str(exc))}", soft_wrap=True)
        raise typer.Exit(LOCKED_EXIT) from None
    except OSError as exc:
        err_console.print(f"[red]cannot lock {escape(root)}:[/red] {escape(str(exc))}", soft_wrap=True)
        raise typer.Exit(1) from None
    try:
        yield lock
    finally:
        lock.release()


def _run_root(cfg) -> str:
    """`<run.output_root>/<run.name>`: what `arborl run` writes and `arborl run` / `promote` lock."""
    from arborl.components.artifacts import storage

    try:
        return storage.child(cfg.run.output_root, cfg.run.name)
    except ValueError as exc:
        err_console.print(f"[red]config error:[/red] run.name: {escape(str(exc))}", soft_wrap=True)
        raise typer.Exit(2) from None


def _check_tracking(cfg) -> None:
    """With tracking on, fail at once (code 1, one line naming the URL) when its store cannot be used."""
    if not cfg.tracking.enabled:
        return
    from arborl.components.tracking.store import TrackingUnavailable, check_tracking_uri, tracking_uri

    try:
        check_tracking_uri(tracking_uri(cfg))
    except (TrackingUnavailable, ValueError) as exc:
        err_console.print(f"[red]tracking:[/red] {escape(str(exc))}", soft_wrap=True)
        raise typer.Exit(1) from None


def _preflight(cfg) -> None:
    """What the run needs from outside its config (orchestration/preflight.py): each problem one line on stderr,
    then exit 2."""
    from arborl.components.orchestration.preflight import preflight

    problems = preflight(cfg)
    for problem in problems:
        err_console.print(f"[red]preflight:[/red] {escape(problem)}", soft_wrap=True)
    if problems:
        raise typer.Exit(2)
