"""`arborl seed-champion`, `promote`, `report` and `alerts`: the model registry, its gate and its notifications."""

from __future__ import annotations

import json
import os
import sys
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
    _run_root,
    console,
)
from arborl.flows.cli.errors import err_console, guarded


@guarded("seed-champion")
def seed_champion(
    config: Optional[Path] = ConfigOpt,
    model: str = typer.Option(..., "--model", help="Model directory: local path, s3:// URI or Hugging Face Hub id."),
    overrides: Optional[list[str]] = OverridesArg,
) -> None:
    """Register a base model as a new version of registry.model_name (its own MLflow run, tagged
    arborl.origin=seed) and point the alias champion at it: the start of a registry that `retrain` trains from."""
    cfg = _load(config, overrides)
    if not cfg.tracking.enabled:
        err_console.print("[red]seed-champion needs tracking.enabled (the registry lives in the MLflow store)[/red]")
        raise typer.Exit(2)
    _check_tracking(cfg)
    from arborl.components.registry.store import seed_champion as seed

    version = seed(cfg, model)
    console.print(f"registered {escape(cfg.registry.model_name)} v{version} from {escape(model)} as champion",
                  soft_wrap=True)


@guarded("promote")
def promote(
    ctx: typer.Context,
    config: Optional[Path] = ConfigOpt,
    questions: Optional[str] = typer.Option(None, "--questions", help="val | test (default: registry.split)."),
    overrides: Optional[list[str]] = OverridesArg,
) -> None:
    """Gated promotion: evaluate `challenger` and `champion` (or the warm start) on the same questions and
    move `champion` only when the paired improvement's bootstrap lower bound beats registry.margin. Holds the
    lock of the config's run root, like `arborl run`."""
    cfg = _load(config, overrides)
    if questions not in (None, "val", "test"):
        err_console.print(f"[red]--questions must be val or test, got {questions!r}[/red]")
        raise typer.Exit(2)
    ctx.with_resource(_locked(_run_root(cfg), "arborl promote"))
    _check_tracking(cfg)
    from arborl.components.registry.promotion import promote as run_promotion
    from arborl.components.stages.evaluate import evaluate_model

    result = run_promotion(cfg, evaluate_model, questions)
    console.print(result.markdown())
    if result.out:
        console.print(f"rows and decision: {result.out}/")


@guarded("report")
def report(
    config: Optional[Path] = ConfigOpt,
    as_json: bool = typer.Option(False, "--json", help="Print the rows as JSON instead of a table."),
    overrides: Optional[list[str]] = OverridesArg,
) -> None:
    """The registered versions of `registry.model_name`: when each was made and by which run, its gate decision
    and numbers, and who was champion before and after it (read from the tags the promotion sets)."""
    cfg = _load(config, overrides)
    _check_tracking(cfg)
    from arborl.flows.report import registry_rows, rich_table

    rows = registry_rows(cfg)
    if as_json:
        sys.stdout.write(json.dumps(rows) + "\n")
        return
    name = cfg.registry.model_name
    if not rows:
        console.print(f"registered model {escape(name)!r} has no versions yet")
        return
    console.print(rich_table(name, rows))
    for row in rows:
        if row["description"]:
            console.print(f"v{row['version']}: {escape(row['description'])}", soft_wrap=True)


@guarded("alerts")
def alerts(
    webhook_url: str = typer.Option(..., "--webhook-url", help="Where the JSON notifications are POSTed."),
    prefix: str = typer.Option("arborl", "--prefix", help="Name prefix of the notification block and automations."),
    flows: str = typer.Option("arborl-*", "--flows", help="Flow names whose failed/crashed runs alert ('*' ends a "
                              "wildcard)."),
) -> None:
    """Create or update the Prefect automations that POST a JSON notification ({title, body, source}) to
    --webhook-url when a flow run fails or crashes and when the promotion gate rejects a challenger. Needs
    PREFECT_API_URL pointing at a running `prefect server start` (automations run on the server)."""
    if not os.environ.get("PREFECT_API_URL"):
        err_console.print("[red]alerts:[/red] set PREFECT_API_URL to a running Prefect server (prefect server start); "
                      "automations cannot live on the temporary server of a single command")
        raise typer.Exit(2)
    _prefect_env()
    from arborl.flows.alerts import create_alerts

    done = create_alerts(webhook_url, prefix=prefix, flow_name_pattern=flows)
    for line in done:
        console.print(escape(line), soft_wrap=True)

