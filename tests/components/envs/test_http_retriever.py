"""components.envs.http_retriever: the search tool over Search-R1's retrieval-server API."""

from __future__ import annotations

import json
import random
import re
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from arborl.components.config import ConfigError, config_from_dict
from arborl.components.envs.corpus import write_corpus
from arborl.components.envs.http_retriever import HTTPRetriever
from arborl.components.envs.retrieval_server import start_in_thread
from arborl.components.envs.retriever import FTSRetriever, Retriever, RetrieverError
from arborl.components.envs.world import RELATIONS
from arborl.components.sampling.agent import SearchEnv
from arborl.components.stages.base import load_retriever

# --- against the real server, over an exported synthetic corpus ------------------------------------------


@pytest.fixture(scope="module")
def server(facts, tmp_path_factory):
    corpus = tmp_path_factory.mktemp("corpus") / "corpus.jsonl"
    write_corpus(facts, str(corpus))
    srv = start_in_thread(str(corpus), port=0)
    yield srv
    srv.stop()


def _queries(world, facts) -> list[str]:
    """Gold queries of every relation, random bags of corpus words and a few oddities."""
    queries = [RELATIONS[r][1].format(s=s) for (s, r) in sorted(world.facts)]
    vocab = sorted({w for f in facts for w in re.findall(r"[a-z0-9]+", f["text"].lower())})
    rng = random.Random(3)
    queries += [" ".join(rng.sample(vocab, rng.randint(1, 5))) for _ in range(150)]
    queries += [f"{p} born" for p in world.people[:20]]
    return queries + ["", "   ", "?!.", 'born AND "x', "qqqunknownword", "NOT near("]


@pytest.mark.parametrize("k", [None, 1, 5])
def test_http_results_equal_the_in_process_index(server, world, facts, k):
    queries = _queries(world, facts)
    local = FTSRetriever([f["text"] for f in facts], top_k=3)
    with HTTPRetriever(server.url, topk=3) as remote:
        got = remote.search_batch(queries, k)
    assert got == local.search_batch(queries, k)
    assert sum(bool(docs) for docs, _ in got) > len(queries) // 2
    assert all(error is None for _, error in got)


def test_single_search_and_the_agent_environment(server, world, facts, tokenizer):
    local = FTSRetriever([f["text"] for f in facts], top_k=3)
    remote = HTTPRetriever(server.url, topk=3)
    assert isinstance(remote, Retriever) and isinstance(local, Retriever)
    person = world.people[0]
    query = RELATIONS["born_in"][1].format(s=person)
    assert remote.search(query) == local.search(query)
    assert remote.search(query, k=2) == local.search(query, k=2)
    # the agent's environment calls the retriever unchanged
    assert SearchEnv(remote, tokenizer).observe(query) == SearchEnv(local, tokenizer).observe(query)
    remote.close()


# --- a scripted local server: counts requests, answers as told -------------------------------------------


def _answer(queries: list[str]) -> dict:
    return {"result": [[{"document": {"id": str(i), "contents": f"doc about {q}"}, "score": 1.0}]
                       for i, q in enumerate(queries)]}


class Scripted:
    """Request bodies seen, and a `reply(n, body) -> (status, payload, delay_s)` for the n-th request (from 0)."""

    def __init__(self, reply: Callable[[int, dict], tuple[int, object, float]]):
        self.reply = reply
        self.bodies: list[dict] = []
        self._lock = threading.Lock()


@contextmanager
def scripted_server(reply: Callable[[int, dict], tuple[int, object, float]]) -> Iterator[tuple[str, Scripted]]:
    """A stdlib HTTP server on 127.0.0.1 (a free port) answering POST /retrieve by `reply`."""
    state = Scripted(reply)

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 (the stdlib's name)
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            with state._lock:
                n = len(state.bodies)
                state.bodies.append(body)
            status, payload, delay = state.reply(n, body)
            time.sleep(delay)
            data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
            try:
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)
            except OSError:  # the client gave up (timeout)
                pass

        def log_message(self, *args: object) -> None:
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}", state
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(5)


def _ok(n: int, body: dict) -> tuple[int, object, float]:
    return 200, _answer(body["queries"]), 0.0


def test_one_request_per_batch_and_repeats_from_memory():
    with scripted_server(_ok) as (url, seen):
        r = HTTPRetriever(url, topk=4, retries=0)
        got = r.search_batch(["alpha", "", "beta", "alpha", "  ", "gamma"])
        assert seen.bodies == [{"queries": ["alpha", "beta", "gamma"], "topk": 4, "return_scores": True}]
        assert [docs for docs, _ in got] == [["doc about alpha"], [], ["doc about beta"], ["doc about alpha"], [],
                                             ["doc about gamma"]]
        assert all(error is None for _, error in got)
        # remembered queries cost nothing; a new one costs one request for it alone
        assert r.search_batch(["beta", "delta", "alpha"])[1] == (["doc about delta"], None)
        assert [b["queries"] for b in seen.bodies] == [["alpha", "beta", "gamma"], ["delta"]]
        assert r.search_batch(["", "alpha"]) == [([], None), (["doc about alpha"], None)]
        assert r.search_batch(["alpha"], k=2) == [(["doc about alpha"], None)]  # another k asks again
        assert [b["topk"] for b in seen.bodies] == [4, 4, 2]
        assert r.search_batch([]) == []
        assert len(seen.bodies) == 3


def test_documents_without_the_score_wrapper_are_read_too():
    def bare(n: int, body: dict) -> tuple[int, object, float]:
        return 200, {"result": [[{"id": "7", "contents": "\"Title\"\nsome text"}] for _ in body["queries"]]}, 0.0

    with scripted_server(bare) as (url, _):
        assert HTTPRetriever(url).search("x") == ["\"Title\"\nsome text"]


def test_server_errors_are_retried_with_backoff_then_every_query_gets_an_error():
    with scripted_server(lambda n, body: (500, {"detail": "index on fire"}, 0.0)) as (url, seen):
        r = HTTPRetriever(url, retries=2, backoff_s=0.05)
        started = time.monotonic()
        got = r.search_batch(["a", "", "b"])
        elapsed = time.monotonic() - started
        with pytest.raises(RetrieverError, match="HTTP 500"):
            HTTPRetriever(url, retries=0).search("a")  # a single search raises instead
    assert len(seen.bodies) == 4  # the first try and two retries, then the single search
    assert elapsed >= 0.05 + 0.10  # backoff_s · 2^i before retry i
    assert got[1] == ([], None)
    for docs, error in (got[0], got[2]):
        assert docs == [] and f"{url}/retrieve" in error and "HTTP 500" in error and "3 attempt" in error


def test_a_transient_failure_is_recovered_by_a_retry():
    def flaky(n: int, body: dict) -> tuple[int, object, float]:
        return (503, b"busy", 0.0) if n < 2 else _ok(n, body)

    with scripted_server(flaky) as (url, seen):
        got = HTTPRetriever(url, retries=3, backoff_s=0.01).search_batch(["a", "b"])
    assert got == [(["doc about a"], None), (["doc about b"], None)]
    assert len(seen.bodies) == 3


@pytest.mark.parametrize("payload", [
    b"not json", {"nope": []}, {"result": [[]]}, {"result": [[{"document": {"id": 1}}], []]}, {"result": "x"},
])
def test_malformed_answers_are_retried_then_reported(payload):
    with scripted_server(lambda n, body: (200, payload, 0.0)) as (url, seen):
        got = HTTPRetriever(url, retries=1, backoff_s=0.0).search_batch(["a", "b"])
    assert len(seen.bodies) == 2
    assert all(docs == [] and "malformed response" in error and url in error for docs, error in got)


def test_a_client_error_is_not_retried():
    with scripted_server(lambda n, body: (422, {"detail": "bad topk"}, 0.0)) as (url, seen):
        (docs, error), = HTTPRetriever(url, retries=3, backoff_s=0.0).search_batch(["a"])
    assert len(seen.bodies) == 1
    assert docs == [] and "HTTP 422" in error and "bad topk" in error


def test_a_closed_port_is_a_connection_error_per_query():
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    url = f"http://127.0.0.1:{port}"
    got = HTTPRetriever(url, retries=1, backoff_s=0.0, timeout_s=2.0).search_batch(["a", "b"])
    assert all(docs == [] and f"{url}/retrieve" in error and "Connect" in error for docs, error in got)


def test_a_slow_server_times_out():
    with scripted_server(lambda n, body: (200, _answer(body["queries"]), 0.6)) as (url, seen):
        started = time.monotonic()
        (docs, error), = HTTPRetriever(url, timeout_s=0.1, retries=1, backoff_s=0.0).search_batch(["a"])
        elapsed = time.monotonic() - started
    assert docs == [] and "timed out" in error and url in error
    assert len(seen.bodies) == 2 and elapsed < 1.0


def test_arguments_are_checked():
    with pytest.raises(ValueError, match="topk"):
        HTTPRetriever("http://127.0.0.1:1", topk=0)
    with pytest.raises(ValueError, match="k must be at least 1"):
        HTTPRetriever("http://127.0.0.1:1").search_batch(["a"], k=0)


# --- configuration and wiring ------------------------------------------------------------------------------


def test_search_config_needs_a_url_for_http():
    with pytest.raises(ConfigError, match="search.url"):
        config_from_dict({"search": {"backend": "http"}})
    with pytest.raises(ConfigError, match="search.url"):
        config_from_dict({"search": {"backend": "http", "url": "127.0.0.1:8000"}})
    with pytest.raises(ConfigError, match="world.search_top_k"):
        config_from_dict({"world": {"search_top_k": 3}})
    cfg = config_from_dict({"search": {"backend": "http", "url": "http://127.0.0.1:8000/"}})
    assert cfg.search.url == "http://127.0.0.1:8000" and cfg.search.topk == 3


def test_load_retriever_picks_the_backend(tmp_path):
    cfg = config_from_dict({"search": {"backend": "http", "url": "http://127.0.0.1:9", "topk": 5, "retries": 0,
                                       "timeout_s": 1.0}})
    r = load_retriever(str(tmp_path / "no-world-needed"), cfg)
    assert isinstance(r, HTTPRetriever)
    assert (r.endpoint, r.top_k, r.retries) == ("http://127.0.0.1:9/retrieve", 5, 0)
    with pytest.raises(FileNotFoundError):  # fts reads the world's facts
        load_retriever(str(tmp_path / "no-world"), config_from_dict({}))
