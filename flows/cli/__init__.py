"""The `arborl` command line: run the pipeline, run one stage, show a resolved config."""

from __future__ import annotations

import logging

import typer

from arborl.flows.cli import bench, compare, data, pipeline, registry
from arborl.flows.cli.errors import DEBUG

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Tree-GRPO training pipeline for LLM agents.")
for _name in ("mlflow.store.db.utils", "alembic"):  # "Creating initial MLflow database tables", migrations
    logging.getLogger(_name).setLevel(logging.WARNING)


@app.callback()
def _global(debug: bool = typer.Option(False, "--debug", help="Print the full traceback of a failure.")) -> None:
    DEBUG["on"] = debug


# the commands, in the order `arborl --help` lists them (the bench group comes after them)
app.command()(pipeline.run)
app.command()(pipeline.stage)
app.command("merge-shards")(pipeline.merge_shards)
app.command("config")(data.show_config)
app.command("serve-retriever")(data.serve_retriever)
app.command("export-corpus")(data.export_corpus)
app.command("export-data")(data.export_data)
app.command("seed-champion")(registry.seed_champion)
app.add_typer(bench.bench_app, name="bench")
app.command()(registry.promote)
app.command()(registry.report)
app.command()(compare.compare)
app.command()(registry.alerts)


def main() -> None:
    app()
