"""components.envs.corpus: the world's facts as a Search-R1 JSONL corpus."""

from __future__ import annotations

import json

import pytest

from arborl.components.artifacts import schemas
from arborl.components.artifacts.storage import ArtifactError
from arborl.components.envs.corpus import export_corpus, write_corpus
from arborl.components.envs.retrieval_server import load_corpus


def test_export_writes_one_line_per_fact_in_doc_id_order(tmp_path, facts):
    world = tmp_path / "prepare"
    schemas.write(facts, schemas.FACTS, str(world / schemas.FACTS_FILE))
    out = tmp_path / "out" / "corpus.jsonl"
    assert export_corpus(str(world), str(out)) == len(facts)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert rows == [{"id": str(f["doc_id"]), "contents": f["text"]} for f in facts]
    assert [r["id"] for r in rows] == [str(i) for i in range(len(facts))]
    assert sorted(p.name for p in out.parent.iterdir()) == ["corpus.jsonl"]  # no temporary file left
    corpus = load_corpus(str(out))
    assert corpus.contents == [f["text"] for f in facts]


def test_write_replaces_an_existing_file(tmp_path):
    out = tmp_path / "c.jsonl"
    out.write_text("old\n")
    assert write_corpus([{"doc_id": 3, "text": "café \"quoted\"\nsecond line"}], str(out)) == 1
    assert [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()] == \
        [{"id": "3", "contents": "café \"quoted\"\nsecond line"}]


def test_export_of_a_missing_or_broken_world_names_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="facts.parquet"):
        export_corpus(str(tmp_path / "nowhere"), str(tmp_path / "c.jsonl"))
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / schemas.FACTS_FILE).write_bytes(b"not parquet")
    with pytest.raises(ArtifactError, match="facts.parquet"):
        export_corpus(str(tmp_path / "broken"), str(tmp_path / "c.jsonl"))
    assert not (tmp_path / "c.jsonl").exists()
