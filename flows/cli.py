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


bench_app = typer.Typer(add_completion=False, no_args_is_help=True, help="Benchmarks measured side by side in one run.")
app.add_typer(bench_app, name="bench")


@bench_app.command("sampling")
def bench_sampling(
    config: Optional[Path] = ConfigOpt,
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object instead of a table."),
    model: Optional[str] = typer.Option(None, "--model", help="Trained model directory (default: a short warm start)."),
    warmstart_steps: int = typer.Option(150, "--warmstart-steps", help="Warm-start steps when --model is not given."),
    quick: bool = typer.Option(False, "--quick", help="A few seconds: tiny warm start, few prompts, batch 8 only."),
    overrides: Optional[list[str]] = OverridesArg,
) -> None:
    """Trees vs chains (trajectories per token and per second), the HF backend vs model.generate, peak memory."""
    from components.bench.sampling import run_benchmark

    cfg = _load(config, overrides)
    if quick:
        result = run_benchmark(cfg, model, warmstart_steps=min(warmstart_steps, 10), prompts=4, repeats=1,
                               batch_sizes=(8,), decode_tokens=16)
    else:
        result = run_benchmark(cfg, model, warmstart_steps=warmstart_steps)
    if as_json:
        sys.stdout.write(json.dumps(result) + "\n")
        return
    from rich.table import Table

    table = Table("metric", "value", title="arborl bench sampling")
    for key, value in result.items():
        if isinstance(value, dict):
            value = "  ".join(f"{k}: {v:.3g}" for k, v in value.items())
        elif isinstance(value, float):
            value = f"{value:.4g}"
        table.add_row(key, str(value))
    console.print(table)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
