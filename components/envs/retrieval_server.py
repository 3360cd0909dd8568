"""A retrieval server with Search-R1's API over a JSONL corpus, ranked by the in-process FTS5 index.

Corpus: one JSON object per line, `{"id": ..., "contents": "..."}` (Search-R1's convention: contents is
`"Title"\\ntext` or just text). Endpoints: `POST /retrieve` with `{"queries": [...], "topk": k,
"return_scores": bool}` → `{"result": [[{"document": {"id", "contents"}, "score": s}, ...], ...]}` (without
scores each entry is the document itself), and `GET /health`.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from dataclasses import dataclass
from typing import Annotated, Any

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field

from arborl.components.artifacts import storage
from arborl.components.envs.retriever import FTSRetriever

DEFAULT_HOST = "127.0.0.1"


class CorpusError(ValueError):
    """A corpus file that cannot be served; the message names the file and the line."""


@dataclass
class Corpus:
    ids: list[Any]
    contents: list[str]


def load_corpus(uri: str) -> Corpus:
    """Read a JSONL corpus (local path or URI); blank lines are skipped, anything else must be an object with
    an `id` (string or integer) and a `contents` string."""
    fs, path = storage.filesystem(uri)
    if not fs.exists(path):
        raise FileNotFoundError(f"corpus file not found: {uri}")
    ids: list[Any] = []
    contents: list[str] = []
    with fs.open(path, "rb") as fh:
        for number, raw in enumerate(fh, 1):
            try:
                line = raw.decode("utf-8").strip()
            except UnicodeDecodeError as exc:
                raise CorpusError(f"{uri}: line {number}: not UTF-8 ({exc.reason})") from None
            if not line:
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise CorpusError(f"{uri}: line {number}: not valid JSON ({exc.msg})") from None
            if not isinstance(row, dict):
                raise CorpusError(f"{uri}: line {number}: expected an object with 'id' and 'contents', "
                                  f"got {type(row).__name__}")
            if not isinstance(row.get("contents"), str):
                raise CorpusError(f"{uri}: line {number}: 'contents' must be a string")
            doc_id = row.get("id")
            if isinstance(doc_id, bool) or not isinstance(doc_id, (str, int)):
                raise CorpusError(f"{uri}: line {number}: 'id' must be a string or an integer")
            ids.append(doc_id)
            contents.append(row["contents"])
    if not contents:
        raise CorpusError(f"{uri}: no documents")
    return Corpus(ids, contents)


MAX_TOPK = 1000  # documents per query a request may ask for
MAX_QUERIES = 4096  # queries in one request
MAX_QUERY_CHARS = 4096  # characters in one query
MAX_BODY_BYTES = 4 << 20  # a request body larger than this is refused before it is read


class RetrieveRequest(BaseModel):
    queries: list[Annotated[str, Field(max_length=MAX_QUERY_CHARS)]] = Field(
        max_length=MAX_QUERIES, description="Queries, answered in order.")
    topk: int | None = Field(None, ge=1, le=MAX_TOPK,
                             description="Documents per query; null uses the server's default.")
    return_scores: bool = Field(False, description="Wrap each document as {document, score}.")


def build_app(corpus: Corpus, topk: int = 3) -> FastAPI:
    """The FastAPI app serving `corpus` with FTSRetriever's ranking (phrase matches, then bm25)."""
    index = FTSRetriever(corpus.contents, top_k=topk)
    app = FastAPI(title="arborl retrieval server")

    @app.middleware("http")
    async def bounded_body(request: Request, call_next):
        """Refuse a body over MAX_BODY_BYTES by its declared length, before reading it (413)."""
        length = request.headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > MAX_BODY_BYTES):
            return JSONResponse({"detail": f"request body over {MAX_BODY_BYTES} bytes"}, status_code=413)
        if length is None and request.method == "POST":
            return JSONResponse({"detail": "a POST needs a Content-Length"}, status_code=411)
        return await call_next(request)

    @app.get("/health")
    def health() -> dict[str, Any]:
        return {"status": "ok", "documents": len(corpus.contents), "topk": topk}

    @app.post("/retrieve")
    def retrieve(request: RetrieveRequest) -> dict[str, Any]:
        result = []
        for query in request.queries:
            entries = []
            for rowid, text, score in index.hits(query, request.topk):
                doc = {"id": corpus.ids[rowid], "contents": text}
                entries.append({"document": doc, "score": score} if request.return_scores else doc)
            result.append(entries)
        return {"result": result}

    return app


def bind(host: str = DEFAULT_HOST, port: int = 8000) -> socket.socket:
    """A listening TCP socket on (host, port); port 0 picks a free one. Connections made before the server runs
    wait in the backlog, so the address can be announced at once."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
        sock.listen(2048)
    except OSError:
        sock.close()
        raise
    sock.set_inheritable(True)
    return sock


def _server(app: FastAPI, log_level: str | None) -> uvicorn.Server:
    """A uvicorn server for `app`; log_level None leaves the process's logging configuration alone."""
    options: dict[str, Any] = {"log_level": log_level} if log_level else {"log_config": None}
    return uvicorn.Server(uvicorn.Config(app, access_log=False, lifespan="off", **options))


def serve(app: FastAPI, sock: socket.socket, log_level: str = "info") -> None:
    """Serve `app` on a bound socket (see `bind`) until interrupted."""
    _server(app, log_level).run(sockets=[sock])


class BackgroundServer:
    """`app` served from a daemon thread on 127.0.0.1 (or `host`); `port` is the bound port. Use as a context
    manager or call `stop()`."""

    def __init__(self, app: FastAPI, host: str = DEFAULT_HOST, port: int = 0, log_level: str | None = None):
        self.host = host
        self._sock = bind(host, port)
        self.port: int = self._sock.getsockname()[1]
        self._server = _server(app, log_level)
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [self._sock]}, daemon=True,
                                        name=f"retrieval-server-{self.port}")

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def start(self, timeout_s: float = 10.0) -> int:
        """Start serving; returns the bound port once the server accepts requests."""
        self._thread.start()
        deadline = time.monotonic() + timeout_s
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"retrieval server on {self.url} did not start within {timeout_s}s")
            time.sleep(0.01)
        return self.port

    def stop(self, timeout_s: float = 10.0) -> None:
        """Ask the server to exit, wait for its thread, and close the socket."""
        self._server.should_exit = True
        if self._thread.is_alive():
            self._thread.join(timeout_s)
        self._sock.close()

    def __enter__(self) -> BackgroundServer:
        if not self._thread.is_alive():
            self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def start_in_thread(corpus_uri: str, host: str = DEFAULT_HOST, port: int = 0, topk: int = 3) -> BackgroundServer:
    """Load `corpus_uri` and serve it from a background thread; returns the started server (`.port`, `.url`,
    `.stop()`)."""
    server = BackgroundServer(build_app(load_corpus(corpus_uri), topk), host, port)
    server.start()
    return server
