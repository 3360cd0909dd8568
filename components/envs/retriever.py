"""The `search` tool: fact sentences in an in-memory SQLite FTS5 index, and the retriever contract.

Ranking: documents that contain the whole query as a phrase come first, then every document that
matches any query term, each group by bm25. Plain bm25 ignores word order, so "the mentor of X" would
tie X's own mentor fact with every fact naming X as somebody else's mentor; the phrase tier breaks that
tie the way a reader would.
"""

from __future__ import annotations

import re
import sqlite3
import threading
from typing import Protocol, runtime_checkable

import pyarrow as pa

_TERM = re.compile(r"[a-z0-9]+")
MEMO_ENTRIES = 100_000  # remembered results; cleared when full

# One search result: (rowid of the document in the index, its text, its score; higher is better).
Hit = tuple[int, str, float]


class RetrieverError(RuntimeError):
    """The search tool failed for a query (recorded per episode, never a crashed stage)."""


@runtime_checkable
class Retriever(Protocol):
    """What the agent's `search` tool needs: documents (corpus `contents` strings) per query, best first."""

    def search(self, query: str, k: int | None = None) -> list[str]:
        """Top-k documents of one query; raises RetrieverError when the search fails."""
        ...

    def search_batch(self, queries: list[str], k: int | None = None) -> list[tuple[list[str], str | None]]:
        """(documents, error message or None) per query, in order; never raises for a failed search."""
        ...


class FTSRetriever:
    """Top-k search over a list of documents: phrase matches first, then OR-ed terms by bm25.

    Safe to share between threads (one lock around the index and the memo)."""

    def __init__(self, docs: list[str], top_k: int = 3):
        if top_k < 1:
            raise ValueError(f"top_k must be at least 1, got {top_k}")
        self.top_k = top_k
        self.docs = docs
        self._db = sqlite3.connect(":memory:", check_same_thread=False)
        self._db.execute("CREATE VIRTUAL TABLE docs USING fts5(text)")
        self._db.executemany("INSERT INTO docs(rowid, text) VALUES (?, ?)", enumerate(docs))
        self._lock = threading.Lock()
        # Results by (normalised terms, k): the index never changes, and the chains and branches of one
        # question issue the same queries again and again.
        self._memo: dict[tuple[tuple[str, ...], int], list[Hit]] = {}

    @classmethod
    def from_facts(cls, facts: pa.Table, top_k: int = 3) -> FTSRetriever:
        return cls(facts.column("text").to_pylist(), top_k=top_k)

    def _match(self, expression: str, limit: int) -> list[Hit]:
        rows = self._db.execute(
            "SELECT rowid, text, bm25(docs) AS rank FROM docs WHERE docs MATCH ? ORDER BY rank, rowid LIMIT ?",
            (expression, limit),
        ).fetchall()
        return [(rowid, text, -rank) for rowid, text, rank in rows]

    def hits(self, query: str, k: int | None = None) -> list[Hit]:
        """Top-k (rowid, text, score) of one query, best first. The score is the bm25 score (higher is better)
        within the document's tier, so a phrase match may score below a later term match."""
        k = self.top_k if k is None else k
        if k < 1:
            raise ValueError(f"k must be at least 1, got {k}")
        terms = _TERM.findall(query.lower())
        if not terms:
            return []
        key = (tuple(terms), k)
        with self._lock:
            if key in self._memo:
                return list(self._memo[key])
            unique = list(dict.fromkeys(terms))
            try:
                phrase = self._match('"' + " ".join(terms) + '"', k) if len(terms) > 1 else []
                anyterm = self._match(" OR ".join(f'"{t}"' for t in unique), k + len(phrase))
            except sqlite3.Error as exc:
                raise RetrieverError(f"search failed for query {query!r}: {exc}") from exc
            seen, out = set(), []
            for hit in phrase + anyterm:
                if hit[0] not in seen:
                    seen.add(hit[0])
                    out.append(hit)
            if len(self._memo) >= MEMO_ENTRIES:
                self._memo.clear()
            self._memo[key] = out[:k]
        return out[:k]

    def search(self, query: str, k: int | None = None) -> list[str]:
        """Top-k document texts of one query, best first."""
        return [text for _, text, _ in self.hits(query, k)]

    def search_batch(self, queries: list[str], k: int | None = None) -> list[tuple[list[str], str | None]]:
        """(documents, error message or None) per query."""
        out: list[tuple[list[str], str | None]] = []
        for query in queries:
            try:
                out.append((self.search(query, k), None))
            except RetrieverError as exc:
                out.append(([], str(exc)))
        return out
