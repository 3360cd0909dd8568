"""`arborl config`, `serve-retriever`, `export-corpus` and `export-data`: configs, the retriever and data snapshots."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer
from rich.markup import escape

from arborl.flows.cli.common import ConfigOpt, OverridesArg, _load, _preflight, console
from arborl.flows.cli.errors import err_console, guarded


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


@guarded("export-corpus")
def export_corpus(
    world: str = typer.Option(..., "--world", help="Output directory of a prepare stage (holds facts.parquet)."),
    out: str = typer.Option(..., "--out", help="Corpus file to write (JSONL, local path or URI)."),
) -> None:
    """Write the synthetic world's facts as a Search-R1 corpus for `arborl serve-retriever`."""
    from arborl.components.envs.corpus import export_corpus as write

    count = write(world, out)
    console.print(f"wrote {count} documents to {escape(out)}", soft_wrap=True)


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

