"""The synthetic world's facts as a Search-R1-format corpus: JSONL lines `{"id": ..., "contents": ...}`.

Each fact is one document whose contents is its sentence alone (no title line), in doc_id order, so a
retrieval server indexing the file ranks exactly as the in-process FTSRetriever over the same facts.
"""

from __future__ import annotations

import json

import pyarrow as pa

from arborl.components.artifacts import schemas, storage


def corpus_lines(facts: pa.Table | list[dict]) -> list[str]:
    """One JSON line per fact row (`doc_id`, `text`), in the given order."""
    rows = facts.select(["doc_id", "text"]).to_pylist() if isinstance(facts, pa.Table) else facts
    return [json.dumps({"id": str(row["doc_id"]), "contents": row["text"]}, ensure_ascii=False) for row in rows]


def write_corpus(facts: pa.Table | list[dict], out: str) -> int:
    """Write the facts as a JSONL corpus to `out` (local path or URI) atomically; returns the document count."""
    lines = corpus_lines(facts)
    storage.write_bytes(out, "".join(line + "\n" for line in lines).encode("utf-8"))
    return len(lines)


def export_corpus(world_uri: str, out: str) -> int:
    """The corpus of a prepare stage's output directory (its facts.parquet) written to `out`; returns the
    document count."""
    facts = schemas.read(storage.join(world_uri, schemas.FACTS_FILE), schemas.FACTS)
    return write_corpus(facts, out)
