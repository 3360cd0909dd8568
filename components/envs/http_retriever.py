"""The `search` tool over HTTP: a client of Search-R1's retrieval-server API.

`POST {url}/retrieve` with `{"queries": [...], "topk": k, "return_scores": true}` answers
`{"result": [[{"document": {"id": ..., "contents": "..."}, "score": ...}, ...], ...]}`, one list per query.
A batch of queries is one request. Connection errors, timeouts, HTTP 5xx and malformed answers are retried
with exponential backoff; after the last try every query of the batch gets an error message naming the URL
and the cause, so a failed search is recorded per episode, never a crashed stage.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import httpx

from arborl.components.envs.retriever import MEMO_ENTRIES, RetrieverError


class _Retryable(Exception):
    """A failure worth another try (connection, timeout, 5xx, malformed answer)."""


class _Final(Exception):
    """A failure another try would repeat (a 4xx answer)."""


def _documents(entries: Any, where: str) -> list[str]:
    """The `contents` strings of one query's result list (entries with or without the score wrapper)."""
    if not isinstance(entries, list):
        raise _Retryable(f"malformed response: {where} is {type(entries).__name__}, not a list")
    docs = []
    for i, entry in enumerate(entries):
        doc = entry.get("document", entry) if isinstance(entry, dict) else None
        contents = doc.get("contents") if isinstance(doc, dict) else None
        if not isinstance(contents, str):
            raise _Retryable(f"malformed response: {where}[{i}] has no 'contents' string")
        docs.append(contents)
    return docs


class HTTPRetriever:
    """Top-k search on a Search-R1 retrieval server at `url` (e.g. http://127.0.0.1:8000)."""

    def __init__(self, url: str, topk: int = 3, timeout_s: float = 10.0, retries: int = 3, backoff_s: float = 0.5):
        if topk < 1:
            raise ValueError(f"topk must be at least 1, got {topk}")
        if retries < 0 or backoff_s < 0 or timeout_s <= 0:
            raise ValueError(f"need retries >= 0, backoff_s >= 0 and timeout_s > 0, got {retries}, {backoff_s}, "
                             f"{timeout_s}")
        self.url = url.rstrip("/")
        self.endpoint = f"{self.url}/retrieve"
        self.top_k = topk
        self.retries = retries
        self.backoff_s = backoff_s
        self._client = httpx.Client(timeout=timeout_s)
        self._memo: dict[tuple[str, int], list[str]] = {}
        self._lock = threading.Lock()

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> HTTPRetriever:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _post(self, queries: list[str], k: int) -> list[list[str]]:
        """One request; the documents per query, or _Retryable / _Final."""
        try:
            response = self._client.post(self.endpoint, json={"queries": queries, "topk": k, "return_scores": True})
        except httpx.TimeoutException as exc:
            raise _Retryable(f"timed out ({type(exc).__name__})") from exc
        except httpx.TransportError as exc:
            raise _Retryable(f"{type(exc).__name__}: {exc}") from exc
        if response.status_code >= 500:
            raise _Retryable(f"HTTP {response.status_code}: {response.text[:200]}")
        if response.status_code != 200:
            raise _Final(f"HTTP {response.status_code}: {response.text[:200]}")
        try:
            body = response.json()
        except ValueError as exc:
            raise _Retryable(f"malformed response: not JSON ({exc})") from exc
        result = body.get("result") if isinstance(body, dict) else None
        if not isinstance(result, list) or len(result) != len(queries):
            raise _Retryable(f"malformed response: expected 'result' with {len(queries)} lists of documents")
        return [_documents(entries, f"result[{i}]") for i, entries in enumerate(result)]

    def _fetch(self, queries: list[str], k: int) -> tuple[list[list[str]] | None, str | None]:
        """(documents per query, None), or (None, error message) after the last try."""
        attempts = self.retries + 1
        for attempt in range(attempts):
            try:
                return self._post(queries, k), None
            except _Final as exc:
                return None, f"retrieval server {self.endpoint} refused the request: {exc}"
            except _Retryable as exc:
                cause = str(exc)
            if attempt + 1 < attempts:
                time.sleep(self.backoff_s * 2**attempt)
        return None, f"retrieval server {self.endpoint} failed after {attempts} attempt(s): {cause}"

    def search_batch(self, queries: list[str], k: int | None = None) -> list[tuple[list[str], str | None]]:
        """(documents, error message or None) per query, from at most one request. Empty queries get [] and
        remembered queries their earlier answer, without asking the server."""
        k = self.top_k if k is None else k
        if k < 1:
            raise ValueError(f"k must be at least 1, got {k}")
        with self._lock:
            known = {q: self._memo[(q, k)] for q in queries if (q, k) in self._memo}
        ask = list(dict.fromkeys(q for q in queries if q.strip() and q not in known))
        error = None
        if ask:
            docs, error = self._fetch(ask, k)
            if docs is not None:
                with self._lock:
                    if len(self._memo) + len(ask) > MEMO_ENTRIES:
                        self._memo.clear()
                    for query, found in zip(ask, docs, strict=True):
                        self._memo[(query, k)] = found
                known.update(zip(ask, docs, strict=True))
        out: list[tuple[list[str], str | None]] = []
        for query in queries:
            if not query.strip():
                out.append(([], None))
            elif query in known:
                out.append((list(known[query]), None))
            else:
                out.append(([], error))
        return out

    def search(self, query: str, k: int | None = None) -> list[str]:
        """Top-k documents of one query (a batch of one); raises RetrieverError when the search fails."""
        docs, error = self.search_batch([query], k)[0]
        if error is not None:
            raise RetrieverError(error)
        return docs
