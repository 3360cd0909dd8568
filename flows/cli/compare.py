"""`arborl compare`: Tree-GRPO vs GRPO at equal cost over seeds and budgets, printed as tables."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from arborl.flows.cli.common import ConfigOpt, OverridesArg, _load, _prefect_env, console
from arborl.flows.cli.errors import err_console, guarded


@guarded("compare")
def compare(
    config: Optional[Path] = ConfigOpt,
    seeds: int = typer.Option(3, "--seeds", min=1, help="Seeds per method (run.seed, run.seed+1, ...)."),
    budgets: Optional[str] = typer.Option(
        None, "--budgets", help="Sweep: budgets in chains per prompt, e.g. 2,4,8: B chains for GRPO against "
        "budget.shapes[B] for Tree-GRPO (budget.protocol tokens: the same generated-token budget for both; default: "
        "the config's one budget)."),
    overrides: Optional[list[str]] = OverridesArg,
) -> None:
    """Tree-GRPO vs GRPO at equal cost over several seeds (and budgets): by default a budget of B chains picks the
    shapes (budget.protocol); the primary metric and final greedy test EM with paired intervals, what each method
    realized per prompt, and its signal (terminal tables, compare.json, MLflow plots)."""
    from rich.table import Table

    from arborl.components.evaluation.compare import parse_budgets

    try:
        sweep = parse_budgets(budgets) if budgets is not None else None
    except ValueError as exc:
        err_console.print(f"[red]--budgets: {exc}[/red]")
        raise typer.Exit(2) from None
    cfg = _load(config, overrides)
    _prefect_env()
    from arborl.flows.compare import METHOD_COLUMNS, SWEEP_COLUMNS, compare_pipeline, markdown, rows, sweep_rows

    result = compare_pipeline(cfg.model_dump(mode="json"), seeds, sweep)  # a locked method run: exit 3
    for entry, row in zip(result["budgets"], sweep_rows(result), strict=True):
        table = Table(title=f"{row[0]}: final test EM (greedy), mean and 95% t-interval over seeds")
        for col in METHOD_COLUMNS:
            table.add_column(col)
        for method_row in rows(entry):
            table.add_row(*method_row)
        console.print(table)
    console.print("Tree-GRPO vs GRPO at equal cost (seed means), as Markdown:", soft_wrap=True)
    for line in markdown(SWEEP_COLUMNS, sweep_rows(result)):  # plain lines: wide, and ready for docs
        console.print(line, soft_wrap=True, markup=False, highlight=False)
    console.print(result["budget_rule"], soft_wrap=True, markup=False)
    console.print(f"compare.json: {result['out']}   MLflow run: {result['mlflow_run_id']}")

