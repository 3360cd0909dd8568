"""components.envs.retrieval_server: Search-R1's retrieval API over a JSONL corpus, ranked by FTSRetriever."""

from __future__ import annotations

import json
import socket

import httpx
import pytest

from arborl.components.envs.retrieval_server import (
    BackgroundServer,
    CorpusError,
    build_app,
    load_corpus,
    start_in_thread,
)
from arborl.components.envs.retriever import FTSRetriever

DOCS = [
    {"id": "d0", "contents": "\"Paris\"\nparis is the capital of france"},
    {"id": 1, "contents": "alice was born in paris"},
    {"id": "d2", "contents": "bob works for acme"},
    {"id": "d3", "contents": "alice works for acme corp"},
]


def _write(path, rows) -> str:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return str(path)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    corpus = _write(tmp_path_factory.mktemp("corpus") / "corpus.jsonl", DOCS)
    srv = start_in_thread(corpus, port=0, topk=2)
    yield srv
    srv.stop()


def test_health(server):
    assert server.url == f"http://127.0.0.1:{server.port}" and server.port > 0
    assert httpx.get(f"{server.url}/health").json() == {"status": "ok", "documents": 4, "topk": 2}


def test_retrieve_with_scores_follows_the_in_process_ranking(server):
    queries = ["alice works for acme", "paris", "nothing matches this", ""]
    body = httpx.post(f"{server.url}/retrieve", json={"queries": queries, "topk": 3, "return_scores": True}).json()
    local = FTSRetriever([d["contents"] for d in DOCS], top_k=3)
    assert [[e["document"]["contents"] for e in entries] for entries in body["result"]] == \
        [local.search(q) for q in queries]
    first = body["result"][0]
    assert first[0]["document"] == {"id": "d3", "contents": "alice works for acme corp"}
    assert all(isinstance(e["score"], float) for e in first)
    assert body["result"][1][0]["document"]["id"] in ("d0", 1)  # ids come back as the corpus wrote them


def test_retrieve_without_scores_and_the_default_topk(server):
    body = httpx.post(f"{server.url}/retrieve", json={"queries": ["acme"]}).json()
    assert body == {"result": [[{"id": "d2", "contents": "bob works for acme"},
                                {"id": "d3", "contents": "alice works for acme corp"}]]}  # topk 2: the default


@pytest.mark.parametrize("payload", [{"queries": ["a"], "topk": 0}, {"queries": "a"}, {},
                                     {"queries": ["a"], "topk": 10**21}, {"queries": ["a"], "topk": 1001},
                                     {"queries": ["a"] * 4097}, {"queries": ["a" * 4097]}])
def test_bad_requests_are_client_errors(server, payload):
    assert httpx.post(f"{server.url}/retrieve", json=payload).status_code == 422


def test_a_body_over_the_limit_is_refused_unread(server):
    from arborl.components.envs.retrieval_server import MAX_BODY_BYTES

    big = json.dumps({"queries": ["x" * 1000] * (MAX_BODY_BYTES // 1000 + 10)})
    res = httpx.post(f"{server.url}/retrieve", content=big, headers={"content-type": "application/json"})
    assert res.status_code == 413 and "request body over" in res.json()["detail"]
    assert httpx.post(f"{server.url}/retrieve", json={"queries": ["acme"], "topk": 1}).status_code == 200


@pytest.mark.parametrize(("line", "problem"), [
    ("{not json", "not valid JSON"),
    ("[1, 2]", "expected an object"),
    ('{"id": "x"}', "'contents' must be a string"),
    ('{"id": "x", "contents": 5}', "'contents' must be a string"),
    ('{"contents": "text"}', "'id' must be"),
    ('{"id": true, "contents": "text"}', "'id' must be"),
])
def test_a_bad_corpus_line_names_the_file_and_line(tmp_path, line, problem):
    path = _write(tmp_path / "bad.jsonl", [DOCS[0], "", line, DOCS[1]])
    with pytest.raises(CorpusError, match=problem) as err:
        load_corpus(path)
    assert f"{path}: line 3:" in str(err.value)


def test_corpus_edge_cases(tmp_path):
    bad = tmp_path / "latin1.jsonl"
    bad.write_bytes(b'{"id": "a", "contents": "caf\xe9"}\n')
    with pytest.raises(CorpusError, match="line 1: not UTF-8"):
        load_corpus(str(bad))
    with pytest.raises(CorpusError, match="no documents"):
        load_corpus(_write(tmp_path / "empty.jsonl", ["", "  "]))
    with pytest.raises(FileNotFoundError, match="missing.jsonl"):
        load_corpus(str(tmp_path / "missing.jsonl"))
    corpus = load_corpus(_write(tmp_path / "ok.jsonl", ["", *DOCS, ""]))
    assert corpus.ids == ["d0", 1, "d2", "d3"] and corpus.contents[0].startswith('"Paris"\n')


def test_background_servers_pick_free_ports_and_stop_cleanly(tmp_path):
    corpus = load_corpus(_write(tmp_path / "c.jsonl", DOCS))
    with BackgroundServer(build_app(corpus)) as a, BackgroundServer(build_app(corpus)) as b:
        assert a.port != b.port
        assert httpx.get(f"{b.url}/health").status_code == 200
        url = a.url
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{url}/health", timeout=2.0)
    # the port is free again
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", a.port))
