"""The `search` tool: fact sentences in an in-memory SQLite FTS5 index, ranked by bm25."""

from __future__ import annotations

import re
import sqlite3

import pyarrow as pa

_TERM = re.compile(r"[a-z0-9]+")


class RetrieverError(RuntimeError):
    """The search tool failed for a query (recorded per episode, never a crashed stage)."""


class FTSRetriever:
    """Top-k bm25 search over a list of documents. Query terms are OR-ed, so a sloppy query still ranks."""

    def __init__(self, docs: list[str], top_k: int = 3):
        self.top_k = top_k
        self.docs = docs
        self._db = sqlite3.connect(":memory:", check_same_thread=False)
        self._db.execute("CREATE VIRTUAL TABLE docs USING fts5(text)")
        self._db.executemany("INSERT INTO docs(rowid, text) VALUES (?, ?)", enumerate(docs))

    @classmethod
    def from_facts(cls, facts: pa.Table, top_k: int = 3) -> FTSRetriever:
        return cls(facts.column("text").to_pylist(), top_k=top_k)

    def search(self, query: str, k: int | None = None) -> list[str]:
        terms = sorted(set(_TERM.findall(query.lower())), key=query.lower().find)
        if not terms:
            return []
        match = " OR ".join(f'"{t}"' for t in terms)
        try:
            rows = self._db.execute(
                "SELECT text FROM docs WHERE docs MATCH ? ORDER BY bm25(docs), rowid LIMIT ?",
                (match, k or self.top_k),
            ).fetchall()
        except sqlite3.Error as exc:
            raise RetrieverError(f"search failed for query {query!r}: {exc}") from exc
        return [r[0] for r in rows]
