"""The `arborl` command line: run the pipeline, run one stage, show a resolved config."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.markup import escape

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Tree-GRPO training pipeline for LLM agents.")
console = Console(log_path=False)
err_console = Console(stderr=True, log_path=False)  # errors: one line each on stderr
for _name in ("mlflow.store.db.utils", "alembic"):  # "Creating initial MLflow database tables", migrations
    logging.getLogger(_name).setLevel(logging.WARNING)

DEBUG = {"on": False}  # --debug: full tracebacks on the console


@app.callback()
def _global(debug: bool = typer.Option(False, "--debug", help="Print the full traceback of a failure.")) -> None:
    DEBUG["on"] = debug


USER_INPUT_EXIT, INTERNAL_EXIT = 2, 1


@contextlib.contextmanager
def exit_on_errors(what: str, log_dir: str | None = None):
    """One error policy for a command: a failure prints one line on stderr (what failed, the message, a hint) and
    exits 2 for the user's input (config, data, model, reward code, an unreadable artifact), 3 for a conflict
    (another writer's lock, an output location that is not this stage's), 1 for anything else. The traceback goes
    to `<log_dir>/errors.log` where a local `log_dir` is given (appended, with the time and command), to the
    stage's log in Prefect, and, with `arborl --debug`, to the console."""
    from arborl.components.artifacts.manifests import OutputNotOwned
    from arborl.components.artifacts.run_lock import LockHeld
    from arborl.components.artifacts.storage import ArtifactError
    from arborl.components.config import ConfigError
    from arborl.components.evaluation.evaluate import ToolErrors
    from arborl.components.verification.scoring import RewardErrors

    try:
        yield
    except typer.Exit:
        raise
    except Exception as exc:  # noqa: BLE001 - every failure gets its line and exit code
        if DEBUG["on"]:
            err_console.print_exception()
        if isinstance(exc, (LockHeld, OutputNotOwned)):
            code, kind = LOCKED_EXIT, "conflict"
        elif isinstance(exc, (ConfigError, ArtifactError, RewardErrors, ToolErrors, FileNotFoundError, KeyError,
                              ValueError)):
            code, kind = USER_INPUT_EXIT, "input"
        else:
            code, kind = INTERNAL_EXIT, "internal error"
        message = str(exc.args[0]) if isinstance(exc, KeyError) and exc.args else str(exc)
        logged = _log_traceback(log_dir, what, exc)
        hint = ("" if DEBUG["on"] else f" (the traceback: {logged})" if logged
                else " (the traceback: arborl --debug ...)")
        head = (f"{what}: unreadable artifact:" if isinstance(exc, ArtifactError)  # the message names the file
                else f"{what} failed ({kind}): {type(exc).__name__}:")
        err_console.print(f"[red]{escape(head)}[/red] {escape(message)}{hint}", soft_wrap=True)
        raise typer.Exit(code) from None


def _log_traceback(log_dir: str | None, what: str, exc: BaseException) -> str | None:
    """Append `exc`'s traceback to `<log_dir>/errors.log` (local directories only); its path, or None."""
    import datetime
    import traceback

    from arborl.components.artifacts import storage

    if log_dir is None or not storage.is_local(log_dir):
        return None
    path = Path(storage.filesystem(log_dir)[1]) / "errors.log"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("a", encoding="utf-8") as fh:
            fh.write(f"--- {datetime.datetime.now().astimezone().isoformat(timespec='seconds')} {what}: "
                     f"{' '.join(sys.argv)}\n")
            fh.write("".join(traceback.format_exception(exc)))
    except OSError:
        return None
    return str(path)


def guarded(what: str):
    """Decorate a command so that its failures follow `exit_on_errors(what)`: one line on stderr, exit 2, 3 or 1."""
    import functools

    def wrap(fn):
        @functools.wraps(fn)
        def command(*args, **kwargs):
            with exit_on_errors(what):
                return fn(*args, **kwargs)

        return command

    return wrap


ConfigOpt = typer.Option(None, "--config", "-c", help="YAML config (default: configs/tiny.yaml).")
OverridesArg = typer.Argument(None, help="Overrides such as run.iterations=5 sampling.expansion_rounds=0.")


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


LOCKED_EXIT = 3  # another live writer holds the lock of the directory the command would write


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
    from arborl.components.tracking import TrackingUnavailable, check_tracking_uri, tracking_uri

    try:
        check_tracking_uri(tracking_uri(cfg))
    except (TrackingUnavailable, ValueError) as exc:
        err_console.print(f"[red]tracking:[/red] {escape(str(exc))}", soft_wrap=True)
        raise typer.Exit(1) from None


@app.command()
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


@app.command()
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
    from arborl.components.stages import STAGE_INPUTS, STAGE_OPTIONAL_INPUTS, STAGE_PARAMS, STAGES

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
    expected, optional = set(STAGE_INPUTS[name]), set(STAGE_OPTIONAL_INPUTS.get(name, ()))
    if not expected <= set(given) <= expected | optional:
        extra = f" (optional: {sorted(optional)})" if optional else ""
        err_console.print(f"[red]stage {name} needs --in for {sorted(expected)}{extra}, got {sorted(given)}[/red]")
        raise typer.Exit(2)
    params = {"iteration": iteration} if "iteration" in STAGE_PARAMS.get(name, ()) else {}
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
    console.print_json(json.dumps({"stage": name, "out": result.out, "skipped": result.skipped,
                                   "seconds": result.seconds, "outputs": result.outputs, "metrics": result.metrics}))


@app.command("merge-shards")
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
    console.print_json(json.dumps({"stage": "sample", "out": result.out, "skipped": result.skipped,
                                   "outputs": result.outputs, "metrics": result.metrics}))


def _preflight(cfg) -> None:
    """What the run needs from outside its config (components/preflight.py): each problem one line on stderr,
    then exit 2."""
    from arborl.components.preflight import preflight

    problems = preflight(cfg)
    for problem in problems:
        err_console.print(f"[red]preflight:[/red] {escape(problem)}", soft_wrap=True)
    if problems:
        raise typer.Exit(2)


@app.command("config")
@guarded("config")
def show_config(config: Optional[Path] = ConfigOpt, overrides: Optional[list[str]] = OverridesArg,
                check: bool = typer.Option(False, "--check", help="Also run the preflight: the model directory and "
                                           "its chat template, the retriever, the data files (seconds).")) -> None:
    """Validate a config and print it resolved, with overrides applied."""
    import yaml

    cfg = _load(config, overrides)
    if check:
        _preflight(cfg)
    sys.stdout.write(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))


@app.command("serve-retriever")
@guarded("serve-retriever")
def serve_retriever(
    corpus: str = typer.Option(..., "--corpus", help='JSONL corpus: one {"id": ..., "contents": ...} object a line.'),
    host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on (127.0.0.1: this machine only)."),
    port: int = typer.Option(8000, "--port", min=0, max=65535, help="Port; 0 picks a free one (printed)."),
    topk: int = typer.Option(3, "--topk", min=1, help="Documents per query when a request names no topk."),
) -> None:
    """Serve a corpus with Search-R1's retrieval-server API (POST /retrieve, GET /health), ranked like the
    in-process search tool (search.backend=http, search.url=http://HOST:PORT)."""
    from arborl.components.envs.retrieval_server import bind, build_app, load_corpus, serve

    docs = load_corpus(corpus)
    try:
        sock = bind(host, port)
    except OSError as exc:
        raise OSError(f"cannot listen on {host}:{port}: {exc}") from exc
    shown = f"[{host}]" if ":" in host else host
    sys.stdout.write(f"serving {len(docs.contents)} documents on http://{shown}:{sock.getsockname()[1]}\n")
    sys.stdout.flush()
    serve(build_app(docs, topk), sock)


@app.command("export-corpus")
@guarded("export-corpus")
def export_corpus(
    world: str = typer.Option(..., "--world", help="Output directory of a prepare stage (holds facts.parquet)."),
    out: str = typer.Option(..., "--out", help="Corpus file to write (JSONL, local path or URI)."),
) -> None:
    """Write the synthetic world's facts as a Search-R1 corpus for `arborl serve-retriever`."""
    from arborl.components.envs.corpus import export_corpus as write

    count = write(world, out)
    console.print(f"wrote {count} documents to {escape(out)}", soft_wrap=True)


@app.command("export-data")
@guarded("export-data")
def export_data(
    config: Optional[Path] = ConfigOpt,
    out: str = typer.Option(..., "--out", help="Snapshot folder to write (local path or URI), e.g. <root>/2026-11-30."),
    parts: int = typer.Option(1, "--parts", min=1, help="Split the train questions into this many disjoint parts."),
    part: int = typer.Option(0, "--part", min=0, help="Which part (from 0) of the train questions to write."),
    overrides: Optional[list[str]] = OverridesArg,
) -> None:
    """Write the config's synthetic world as a verl / Search-R1 Parquet data snapshot: train.parquet (part --part
    of --parts of the train questions), val.parquet, test.parquet and corpus.jsonl (for `arborl serve-retriever`)."""
    from arborl.components.data.export import export_snapshot

    cfg = _load(config, overrides)
    if part >= parts:
        err_console.print(f"[red]--part must be below --parts ({parts}), got {part}[/red]")
        raise typer.Exit(2)
    counts = export_snapshot(cfg, out, parts, part)
    console.print(f"wrote {escape(out)}: " + ", ".join(f"{v} {k}" for k, v in counts.items()), soft_wrap=True)


@app.command("seed-champion")
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
    from arborl.components.registry import seed_champion as seed

    version = seed(cfg, model)
    console.print(f"registered {escape(cfg.registry.model_name)} v{version} from {escape(model)} as champion",
                  soft_wrap=True)


bench_app = typer.Typer(no_args_is_help=True, help="Benchmarks: ratios measured side by side in one run.")
app.add_typer(bench_app, name="bench")


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


@app.command()
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
    from arborl.components.registry import promote as run_promotion

    result = run_promotion(cfg, questions)
    console.print(result.markdown())
    if result.out:
        console.print(f"rows and decision: {result.out}/")


@app.command()
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


@app.command()
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


@app.command()
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


def main() -> None:
    app()


if __name__ == "__main__":
    main()
