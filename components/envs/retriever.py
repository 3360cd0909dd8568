"""The `search` tool: fact sentences in an in-memory SQLite FTS5 index.

Ranking: documents that contain the whole query as a phrase come first, then every document that
matches any query term, each group by bm25. Plain bm25 ignores word order, so "the mentor of X" would
tie X's own mentor fact with every fact naming X as somebody else's mentor; the phrase tier breaks that
tie the way a reader would.
"""

from __future__ import annotations

import re
import sqlite3

import pyarrow as pa

_TERM = re.compile(r"[a-z0-9]+")
MEMO_ENTRIES = 100_000  # remembered results; cleared when full


class RetrieverError(RuntimeError):
    """The search tool failed for a query (recorded per episode, never a crashed stage)."""


class FTSRetriever:
    """Top-k search over a list of documents: phrase matches first, then OR-ed terms by bm25."""

    def __init__(self, docs: list[str], top_k: int = 3):
        if top_k < 1:
            raise ValueError(f"top_k must be at least 1, got {top_k}")
        self.top_k = top_k
        self.docs = docs
        self._db = sqlite3.connect(":memory:", check_same_thread=False)
        self._db.execute("CREATE VIRTUAL TABLE docs USING fts5(text)")
        self._db.executemany("INSERT INTO docs(rowid, text) VALUES (?, ?)", enumerate(docs))
        # Results by (normalised terms, k): the index never changes, and the chains and branches of one
        # question issue the same queries again and again.
        self._memo: dict[tuple[tuple[str, ...], int], list[str]] = {}

    @classmethod
    def from_facts(cls, facts: pa.Table, top_k: int = 3) -> FTSRetriever:
        return cls(facts.column("text").to_pylist(), top_k=top_k)

    def _match(self, expression: str, limit: int) -> list[tuple[int, str]]:
        return self._db.execute(
            "SELECT rowid, text FROM docs WHERE docs MATCH ? ORDER BY bm25(docs), rowid LIMIT ?", (expression, limit)
        ).fetchall()

    def search(self, query: str, k: int | None = None) -> list[str]:
        k = self.top_k if k is None else k
        if k < 1:
            raise ValueError(f"k must be at least 1, got {k}")
        terms = _TERM.findall(query.lower())
        if not terms:
            return []
        key = (tuple(terms), k)
        if key in self._memo:
            return list(self._memo[key])
        unique = list(dict.fromkeys(terms))
        try:
            phrase = self._match('"' + " ".join(terms) + '"', k) if len(terms) > 1 else []
            anyterm = self._match(" OR ".join(f'"{t}"' for t in unique), k + len(phrase))
        except sqlite3.Error as exc:
            raise RetrieverError(f"search failed for query {query!r}: {exc}") from exc
        seen, out = set(), []
        for rowid, text in phrase + anyterm:
            if rowid not in seen:
                seen.add(rowid)
                out.append(text)
        if len(self._memo) >= MEMO_ENTRIES:
            self._memo.clear()
        self._memo[key] = out[:k]
        return out[:k]
