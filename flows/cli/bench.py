"""`arborl bench ...`: benchmarks that measure ratios side by side in one run (sampling, training, warm start, ...)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

import typer

from arborl.flows.cli.common import ConfigOpt, OverridesArg, _load, _prefect_env, console
from arborl.flows.cli.errors import guarded

bench_app = typer.Typer(no_args_is_help=True, help="Benchmarks: ratios measured side by side in one run.")


def _print_bench(result: dict, title: str, as_json: bool) -> None:
    """One JSON line, or a metric/value table."""
    if as_json:
        sys.stdout.write(json.dumps(result) + "\n")
        return
    from rich.table import Table

    table = Table(title=title)
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key, value in result.items():
        table.add_row(key, f"{value:.4g}" if isinstance(value, float) else str(value))
    console.print(table)


@bench_app.command("sampling")
@guarded("bench sampling")
def bench_sampling(
    config: Optional[Path] = ConfigOpt,
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object instead of a table."),
    model: Optional[str] = typer.Option(None, "--model", help="Trained model directory (default: a short warm start)."),
    warmstart_steps: int = typer.Option(150, "--warmstart-steps", help="Warm-start steps when --model is not given."),
    quick: bool = typer.Option(False, "--quick", help="A few seconds: tiny warm start, few prompts, batch 8 only."),
    overrides: Optional[list[str]] = OverridesArg,
) -> None:
    """Trees vs chains (trajectories per token and per second), the HF backend vs model.generate, peak memory."""
    from arborl.components.bench.sampling import run_benchmark

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


@bench_app.command("training")
@guarded("bench training")
def bench_training_cmd(
    config: Optional[Path] = ConfigOpt,
    workdir: str = typer.Option("runs/bench", help="Where the sampled trees (and their warm start) are kept."),
    warmstart_steps: int = typer.Option(300, help="Warm-start steps of the model that samples the trees."),
    repeats: int = typer.Option(3, help="Timed repetitions per form (median reported)."),
    as_json: bool = typer.Option(False, "--json", help="Print only the JSON result."),
    overrides: Optional[list[str]] = OverridesArg,
) -> None:
    """Packed vs duplicated forward+backward on trees sampled by the config."""
    from arborl.components.bench.training import bench_training

    cfg = _load(config, overrides)
    result = bench_training(cfg, workdir, warmstart_steps=warmstart_steps, repeats=repeats)
    _print_bench(result, "arborl bench training", as_json)


@bench_app.command("warmstart")
@guarded("bench warmstart")
def bench_warmstart_cmd(
    config: Optional[Path] = ConfigOpt,
    workdir: str = typer.Option("runs/bench-warmstart", help="Where the prepared world is kept (reused)."),
    repeats: int = typer.Option(10, help="Timed batches per form (median reported)."),
    as_json: bool = typer.Option(False, "--json", help="Print only the JSON result."),
    overrides: Optional[list[str]] = OverridesArg,
) -> None:
    """The warm start's packed rows vs the padded batch: tokens, forward+backward seconds, gradient agreement."""
    from arborl.components.bench.warmstart import bench_warmstart

    cfg = _load(config, overrides)
    result = bench_warmstart(cfg, workdir, repeats=repeats)
    _print_bench(result, "arborl bench warmstart", as_json)


@bench_app.command("iteration")
@guarded("bench iteration")
def bench_iteration_cmd(
    config: Optional[Path] = ConfigOpt,
    workdir: str = typer.Option("runs/bench-iteration", help="Output root of the bench's runs."),
    iterations: int = typer.Option(20, min=1, help="RL iterations per run."),
    checkpoint_every: int = typer.Option(10, min=1, help="train.checkpoint_every of the 'after' run."),
    model_config: Optional[str] = typer.Option(
        None, "--model-config", help="Instead: one iteration's model I/O at this architecture with random weights "
        "(qwen2.5-0.5b), no sampling."),
    as_json: bool = typer.Option(False, "--json", help="Print only the JSON result."),
    overrides: Optional[list[str]] = OverridesArg,
) -> None:
    """An iteration's seconds and bytes, before vs after keeping the policy warm with the training state every k
    iterations, side by side in one process; or, with --model-config, the model I/O of one iteration at size."""
    from arborl.components.bench.iteration import bench_iteration, model_io

    if model_config is not None:
        _print_bench(model_io(model_config, workdir, checkpoint_every), "arborl bench iteration", as_json)
        return
    cfg = _load(config, overrides)
    _prefect_env()
    result = bench_iteration(cfg, workdir, iterations=iterations, checkpoint_every=checkpoint_every)
    _print_bench(result, "arborl bench iteration", as_json)


@bench_app.command("rewards")
@guarded("bench rewards")
def bench_rewards_cmd(
    responses: int = typer.Option(1000, help="Responses scored by each side."),
    delay_s: float = typer.Option(0.05, help="Seconds each reward call waits."),
    workers: int = typer.Option(16, help="verify.workers of the pooled side."),
    as_json: bool = typer.Option(False, "--json", help="Print only the JSON result."),
) -> None:
    """Verify's reward calls one at a time vs the bounded pool (verify.workers), on a reward that waits."""
    from arborl.components.bench.rewards import bench_rewards

    _print_bench(bench_rewards(responses, delay_s, workers), "arborl bench rewards", as_json)

