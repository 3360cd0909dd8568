"""The `arborl` command line: run the pipeline, run one stage, show a resolved config."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Tree-GRPO training pipeline for LLM agents.")
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


def _load(config: Optional[Path], overrides: Optional[list[str]]):
    from components.config import ConfigError, load_config

    try:
        return load_config(config, overrides or [])
    except ConfigError as exc:
        console.print(f"[red]config error:[/red] {exc}")
        raise typer.Exit(2) from None


@app.command()
def run(config: Optional[Path] = ConfigOpt, overrides: Optional[list[str]] = OverridesArg) -> None:
    """Run the whole pipeline (prepare → warm start → RL iterations → evaluation) as a Prefect flow."""
    cfg = _load(config, overrides)
    _prefect_env()
    from flows.pipeline import train_pipeline
    from flows.progress import RichReporter, set_reporter

    reporter = RichReporter(console)
    set_reporter(reporter)
    try:
        from components.config import DEFAULT_CONFIG

        summary = train_pipeline(cfg.model_dump(mode="json"), str(config or DEFAULT_CONFIG))
    finally:
        reporter.close()
    root = f"{cfg.run.output_root.rstrip('/')}/{cfg.run.name}"
    console.print(f"outputs: {root}/   summary: {root}/summary.json   MLflow run: {summary['mlflow_run_id']}")


@app.command()
def stage(
    name: str = typer.Argument(..., help="prepare | warmstart | sample | verify | label | train | evaluate"),
    config: Optional[Path] = ConfigOpt,
    inputs: Optional[list[str]] = typer.Option(None, "--in", help="Input as key=uri (a stage output directory)."),
    out: str = typer.Option(..., "--out", help="Output directory URI."),
    iteration: int = typer.Option(1, "--iteration", help="Iteration number (sample, train)."),
    overrides: Optional[list[str]] = OverridesArg,
) -> None:
    """Run one stage alone on given input URIs (e.g. as its own container)."""
    from components.stages import STAGE_INPUTS, STAGE_PARAMS, STAGES

    if name not in STAGES:
        console.print(f"[red]unknown stage {name!r}[/red]; choose one of {', '.join(STAGES)}")
        raise typer.Exit(2)
    cfg = _load(config, overrides)
    given = {}
    for item in inputs or []:
        if "=" not in item:
            console.print(f"[red]--in {item!r} must look like key=uri[/red]")
            raise typer.Exit(2)
        key, uri = item.split("=", 1)
        given[key] = uri
    expected = set(STAGE_INPUTS[name])
    if set(given) != expected:
        console.print(f"[red]stage {name} needs --in for {sorted(expected)}, got {sorted(given)}[/red]")
        raise typer.Exit(2)
    params = {"iteration": iteration} if "iteration" in STAGE_PARAMS.get(name, ()) else {}
    try:
        result = STAGES[name](cfg, given, out, **params)
    except (FileNotFoundError, KeyError, ValueError) as exc:
        console.print(f"[red]stage {name} failed:[/red] {exc}")
        raise typer.Exit(1) from None
    console.print_json(json.dumps({"stage": name, "out": result.out, "skipped": result.skipped,
                                   "seconds": result.seconds, "outputs": result.outputs, "metrics": result.metrics}))


@app.command("config")
def show_config(config: Optional[Path] = ConfigOpt, overrides: Optional[list[str]] = OverridesArg) -> None:
    """Validate a config and print it resolved, with overrides applied."""
    import yaml

    cfg = _load(config, overrides)
    sys.stdout.write(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))


@app.command()
def promote(
    config: Optional[Path] = ConfigOpt,
    questions: Optional[str] = typer.Option(None, "--questions", help="val | test (default: registry.split)."),
    overrides: Optional[list[str]] = OverridesArg,
) -> None:
    """Gated promotion: evaluate `challenger` and `champion` (or the warm start) on the same questions and
    move `champion` only when the paired improvement's bootstrap lower bound beats registry.margin."""
    cfg = _load(config, overrides)
    if questions not in (None, "val", "test"):
        console.print(f"[red]--questions must be val or test, got {questions!r}[/red]")
        raise typer.Exit(2)
    from components.registry import promote as run_promotion

    try:
        result = run_promotion(cfg, questions)
    except ValueError as exc:
        console.print(f"[red]promote failed:[/red] {exc}")
        raise typer.Exit(1) from None
    console.print(result.markdown())
    if result.out:
        console.print(f"rows and decision: {result.out}/")


@app.command()
def compare(
    config: Optional[Path] = ConfigOpt,
    seeds: int = typer.Option(3, "--seeds", min=1, help="Seeds per method (run.seed, run.seed+1, ...)."),
    overrides: Optional[list[str]] = OverridesArg,
) -> None:
    """Tree-GRPO vs GRPO at equal generation budget over several seeds: final test EM with confidence
    intervals and EM-vs-generated-tokens curves (terminal table, compare.json, MLflow plot)."""
    from rich.table import Table

    cfg = _load(config, overrides)
    _prefect_env()
    from flows.compare import compare_pipeline, rows

    result = compare_pipeline(cfg.model_dump(mode="json"), seeds)
    table = Table(title="final test EM (greedy), mean and 95% t-interval over seeds")
    for col in ("method", "test EM [95% CI]", "per seed", "generated tokens / prompt"):
        table.add_column(col)
    for row in rows(result):
        table.add_row(*row)
    console.print(table)
    curve = Table(title="test EM vs cumulative generated tokens (seed mean)")
    for col in ("method", "iteration", "generated tokens", "test EM"):
        curve.add_column(col)
    for method, data in result["methods"].items():
        for p in data["curve"]:
            curve.add_row(method, str(p["iteration"]), f"{p['generated_tokens']:.0f}", f"{p['test_em']:.3f}")
    console.print(curve)
    console.print(result["budget_rule"])
    console.print(f"compare.json: {result['out']}   MLflow run: {result['mlflow_run_id']}")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
