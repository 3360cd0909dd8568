"""`arborl run`, `arborl stage` and `arborl merge-shards`: the whole pipeline, one stage alone, sample shards joined."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Optional

import typer
from rich.markup import escape

from arborl.flows.cli.common import (
    ConfigOpt,
    OverridesArg,
    _check_tracking,
    _load,
    _locked,
    _prefect_env,
    _preflight,
    _run_root,
    console,
)
from arborl.flows.cli.errors import DEBUG, LOCKED_EXIT, err_console, exit_on_errors


def _quiet_prefect_console() -> None:
    """Prefect prints a failed task's and flow's traceback on the console; the command prints one line instead
    (`exit_on_errors`), and the traceback stays in the flow run's logs (and on the console with --debug)."""
    if DEBUG["on"]:
        return
    os.environ.setdefault("PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL", "CRITICAL")  # before Prefect sets up logging
    from prefect.logging.handlers import PrefectConsoleHandler

    for name in ("", "prefect"):  # where Prefect already set up its logging in this process
        for handler in logging.getLogger(name).handlers:
            if isinstance(handler, PrefectConsoleHandler):
                handler.setLevel(logging.CRITICAL)


def run(ctx: typer.Context, config: Optional[Path] = ConfigOpt, overrides: Optional[list[str]] = OverridesArg) -> None:
    """Run the whole pipeline (prepare → warm start → RL iterations → evaluation) as a Prefect flow.

    Holds the run root's lock throughout: a second `arborl run` of the same root exits at once (code 3)."""
    cfg = _load(config, overrides)
    _preflight(cfg)  # a missing model, a template without the assistant turn, a retriever that is down: seconds
    ctx.with_resource(_locked(_run_root(cfg), f"arborl run {config or 'configs/tiny.yaml'}"))
    _check_tracking(cfg)  # before Prefect starts: an unreachable tracking server fails in seconds
    _prefect_env()
    from arborl.components.artifacts.storage import ArtifactError
    from arborl.components.data.snapshots import SnapshotError
    from arborl.flows.logs import console_logging
    from arborl.flows.pipeline import SUMMARY_FILE, train_pipeline
    from arborl.flows.progress import RichReporter, set_reporter

    reporter = RichReporter(console)
    set_reporter(reporter)
    ctx.with_resource(console_logging(console))  # stage lines above the progress bars
    _quiet_prefect_console()
    try:
        from arborl.components.config import DEFAULT_CONFIG

        summary = train_pipeline(cfg.model_dump(mode="json"), str(config or DEFAULT_CONFIG))
    except ArtifactError as exc:  # an input that cannot be read: the message names the file and what is wrong
        err_console.print(f"[red]run failed: unreadable artifact:[/red] {escape(str(exc))}", soft_wrap=True)
        raise typer.Exit(2) from None
    except SnapshotError as exc:  # data.snapshot_root / data.snapshot name no usable snapshot: the URI is named
        err_console.print(f"[red]run failed:[/red] {escape(str(exc))}", soft_wrap=True)
        raise typer.Exit(2) from None
    except Exception:
        reporter.close()
        with exit_on_errors("run", _run_root(cfg)):
            raise
    finally:
        reporter.close()
    root = f"{cfg.run.output_root.rstrip('/')}/{cfg.run.name}"
    console.print(f"outputs: {root}/   summary: {root}/{SUMMARY_FILE}   MLflow run: {summary['mlflow_run_id']}")


def stage(
    ctx: typer.Context,
    name: str = typer.Argument(..., help="prepare | warmstart | sample | verify | label | train | evaluate"),
    config: Optional[str] = typer.Option(  # a str: a URI such as s3://... must not be normalised as a path
        None, "--config", "-c", help="YAML or JSON config, a path or a URI such as s3://bucket/run/config.json "
        "(a run's resolved config; default: configs/tiny.yaml).",
    ),
    inputs: Optional[list[str]] = typer.Option(None, "--in", help="Input as key=uri (a stage output directory)."),
    out: str = typer.Option(..., "--out", help="Output directory URI."),
    iteration: int = typer.Option(1, "--iteration", help="Iteration number (sample, train)."),
    shard: Optional[str] = typer.Option(
        None, "--shard", help="sample only: i/n runs the i-th (from 0) of n prompt shards; join with merge-shards."
    ),
    overrides: Optional[list[str]] = OverridesArg,
) -> None:
    """Run one stage alone on given input URIs (e.g. as its own container). Holds the lock of its --out directory
    (`<out>/_lock.json`; under torchrun, rank 0 does): a second command writing the same --out exits at once
    (code 3)."""
    from arborl.components.stages import STAGES
    from arborl.components.stages.contract import PARAMS, MissingInput, inputs_of

    if name not in STAGES:
        err_console.print(f"[red]unknown stage {name!r}[/red]; choose one of {', '.join(STAGES)}")
        raise typer.Exit(2)
    cfg = _load(config, overrides)
    given = {}
    for item in inputs or []:
        if "=" not in item:
            err_console.print(f"[red]--in {item!r} must look like key=uri[/red]")
            raise typer.Exit(2)
        key, uri = item.split("=", 1)
        given[key] = uri
    try:
        inputs_of(name, given)
    except MissingInput as exc:
        err_console.print(f"[red]--in: {exc}[/red]")
        raise typer.Exit(2) from None
    params = {"iteration": iteration} if "iteration" in PARAMS.get(name, ()) else {}
    if shard is not None:
        from arborl.components.stages.sample import parse_shard

        if name != "sample":
            err_console.print(f"[red]--shard applies to the sample stage only, not {name!r}[/red]")
            raise typer.Exit(2)
        try:
            params["shard"] = parse_shard(shard)
        except ValueError as exc:
            err_console.print(f"[red]--shard: {exc}[/red]")
            raise typer.Exit(2) from None
    from arborl.components.artifacts.manifests import OutputNotOwned, check_output

    try:  # before the lock, which lives inside --out: a location this stage may not write is left untouched
        check_output(out, stage=name, inputs=given)
    except OutputNotOwned as exc:  # a conflict: the location holds something this stage does not own
        err_console.print(f"[red]output refused:[/red] {escape(str(exc))}", soft_wrap=True)
        raise typer.Exit(LOCKED_EXIT) from None
    if int(os.environ.get("RANK", "0")) == 0:  # under torchrun only rank 0 writes --out: it holds the lock
        ctx.with_resource(_locked(out, f"arborl stage {name}"))
    with exit_on_errors(f"stage {name}"):
        result = STAGES[name](cfg, given, out, **params)
    console.print_json(json.dumps(result.to_dict()))


def merge_shards(
    ctx: typer.Context,
    shards: list[str] = typer.Argument(..., help="Output URIs of `stage sample --shard i/n`, in shard order."),
    config: Optional[Path] = ConfigOpt,
    out: str = typer.Option(..., "--out", help="Output URI of the merged sample stage."),
    iteration: int = typer.Option(1, "--iteration", help="Iteration number."),
) -> None:
    """Join finished sample shards into one sample output (nodes.parquet, prompt_stats.json, manifest)."""
    from arborl.components.artifacts.manifests import OutputNotOwned, check_output
    from arborl.components.stages.sample import merge

    cfg = _load(config, [])
    inputs = {f"shard{i:05d}": uri for i, uri in enumerate(shards)}
    try:  # before the lock, which lives inside --out
        check_output(out, stage="sample", inputs=inputs)
    except OutputNotOwned as exc:  # a conflict: the location holds something this stage does not own
        err_console.print(f"[red]output refused:[/red] {escape(str(exc))}", soft_wrap=True)
        raise typer.Exit(LOCKED_EXIT) from None
    ctx.with_resource(_locked(out, "arborl merge-shards"))
    with exit_on_errors("merge-shards"):
        result = merge(cfg, shards, out, iteration)
    console.print_json(json.dumps(result.to_dict()))

