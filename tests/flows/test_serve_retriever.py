"""`arborl export-corpus` and `arborl serve-retriever`, and the pipeline's stages on search.backend=http: the
served corpus answers as the in-process index does, so the sampled trees are identical."""

from __future__ import annotations

import json
import math
import queue
import re
import subprocess
import sys
import threading
from pathlib import Path

import httpx
import pytest
from typer.testing import CliRunner

from arborl.components.artifacts import schemas, storage
from arborl.components.config import load_config
from arborl.components.envs.retriever import FTSRetriever
from arborl.components.stages import STAGES
from arborl.flows.cli import app

ROOT = Path(__file__).resolve().parents[2]
MICRO = ROOT / "configs" / "micro.yaml"
runner = CliRunner()
START_TIMEOUT_S = 60.0


def _first_line(proc: subprocess.Popen, timeout_s: float) -> str:
    """The process's first stdout line, waiting at most `timeout_s`."""
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: lines.put(proc.stdout.readline()), daemon=True).start()
    try:
        return lines.get(timeout=timeout_s)
    except queue.Empty:
        return ""


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """A micro world (prepare stage), its exported corpus, and `arborl serve-retriever` serving it on a free
    port of 127.0.0.1 in a subprocess: (world URI, corpus path, base URL)."""
    base = tmp_path_factory.mktemp("served")
    world = str(base / "prepare")
    STAGES["prepare"](load_config(MICRO), {}, world)
    corpus = base / "corpus.jsonl"
    res = runner.invoke(app, ["export-corpus", "--world", world, "--out", str(corpus)])
    assert res.exit_code == 0, res.output
    facts = schemas.read(storage.join(world, schemas.FACTS_FILE), schemas.FACTS)
    assert f"wrote {facts.num_rows} documents" in res.output
    proc = subprocess.Popen(
        [sys.executable, "-m", "arborl.flows.cli", "serve-retriever", "--corpus", str(corpus), "--port", "0",
         "--topk", "3"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    try:
        line = _first_line(proc, START_TIMEOUT_S)
        found = re.search(r"on (http://127\.0\.0\.1:\d+)", line)
        assert found, f"serve-retriever did not report its address: {line!r}"
        url = found.group(1)
        assert f"serving {facts.num_rows} documents" in line
        yield world, corpus, url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


def test_served_corpus_answers_like_the_in_process_index(served):
    world, _, url = served
    health = httpx.get(f"{url}/health", timeout=5.0).json()
    facts = schemas.read(storage.join(world, schemas.FACTS_FILE), schemas.FACTS).to_pylist()
    assert health["status"] == "ok" and health["documents"] == len(facts)
    queries = [f["text"] for f in facts[::7]] + [" ".join(f["text"].split()[:3]) for f in facts[::11]]
    body = httpx.post(f"{url}/retrieve", json={"queries": queries, "topk": 3, "return_scores": True},
                      timeout=10.0).json()
    local = FTSRetriever([f["text"] for f in facts], top_k=3)
    assert [[e["document"]["contents"] for e in entries] for entries in body["result"]] == \
        [local.search(q) for q in queries]
    by_text = {f["text"]: str(f["doc_id"]) for f in facts}
    assert all(e["document"]["id"] == by_text[e["document"]["contents"]] for es in body["result"] for e in es)


def _warm_start_and_sample(root: Path, world: str, *overrides: str) -> dict:
    cfg = load_config(MICRO, list(overrides))
    STAGES["warmstart"](cfg, {"world": world}, str(root / "warmstart"))
    result = STAGES["sample"](cfg, {"model": str(root / "warmstart"), "world": world}, str(root / "sample"),
                              iteration=1)
    assert result.metrics["bad_prompt_count"] == 0, result.metrics["bad_prompts"]
    return schemas.read(storage.join(str(root / "sample"), schemas.NODES_FILE), schemas.NODES).to_pydict()


def test_stages_sample_the_same_trees_over_http_as_in_process(served, tmp_path):
    world, _, url = served
    fts = _warm_start_and_sample(tmp_path / "fts", world, "search.backend=fts")
    http = _warm_start_and_sample(tmp_path / "http", world, "search.backend=http", f"search.url={url}",
                                  "search.retries=0")
    assert len(fts["token_ids"]) > 0
    observed = [t for a, t in zip(fts["action"], fts["text"], strict=True) if a == "search" and "<information>" in t]
    assert any("<information> </information>" not in t for t in observed)  # searches that found documents
    for column in fts:
        if column == "logprobs":  # NaN where masked
            same = [[(math.isnan(a) and math.isnan(b)) or a == b for a, b in zip(x, y, strict=True)]
                    for x, y in zip(fts[column], http[column], strict=True)]
            assert all(all(row) for row in same)
        else:
            assert http[column] == fts[column], column


def test_export_corpus_of_a_missing_world_fails_naming_it(tmp_path):
    res = runner.invoke(app, ["export-corpus", "--world", str(tmp_path / "nowhere"), "--out",
                              str(tmp_path / "c.jsonl")])
    assert res.exit_code == 2  # the user's input (docs/operations.md, exit codes)
    assert "nowhere" in res.output and "facts.parquet" in " ".join(res.output.split())


def test_serve_retriever_refuses_a_bad_corpus_naming_file_and_line(tmp_path):
    corpus = tmp_path / "bad.jsonl"
    corpus.write_text(json.dumps({"id": "0", "contents": "fine"}) + "\n{oops\n")
    res = runner.invoke(app, ["serve-retriever", "--corpus", str(corpus), "--port", "0"])
    assert res.exit_code == 2
    flat = "".join(res.output.split())
    assert "bad.jsonl:line2" in flat and "notvalidJSON" in flat
