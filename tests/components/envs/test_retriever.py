"""components.envs.retriever: FTS5 bm25 search over the fact sentences."""

from __future__ import annotations

import math
import random
import re
from collections import Counter

import pytest

from arborl.components.envs.retriever import FTSRetriever
from arborl.components.envs.world import RELATIONS


def test_gold_birth_query_finds_the_birth_fact(world, retriever):
    for person in world.people:
        gold = RELATIONS["born_in"][0].format(s=person, o=world.facts[(person, "born_in")])
        assert gold in retriever.search(f"{person} born"), person


@pytest.mark.parametrize("relation", ["born_in", "works_for", "located_in", "headquartered_in"])
def test_gold_queries_of_unambiguous_relations(world, retriever, relation):
    subjects = [s for (s, r) in world.facts if r == relation]
    for s in subjects:
        gold = RELATIONS[relation][0].format(s=s, o=world.facts[(s, relation)])
        assert gold in retriever.search(RELATIONS[relation][1].format(s=s)), (relation, s)


def test_gold_mentor_query_finds_the_mentor_fact(world, retriever):
    missed = []
    for person in world.people:
        gold = RELATIONS["mentor"][0].format(s=person, o=world.facts[(person, "mentor")])
        if gold not in retriever.search(RELATIONS["mentor"][1].format(s=person)):
            missed.append(person)
    assert missed == []


def test_or_semantics(world, retriever):
    person = world.people[0]
    gold = RELATIONS["born_in"][0].format(s=person, o=world.facts[(person, "born_in")])
    assert gold in retriever.search(f"{person} born qqqunknownword")
    assert retriever.search("qqqunknownword") == []
    # one known word is enough
    assert retriever.search(f"qqq {person.split()[1]}")


@pytest.mark.parametrize("query", ["", "   ", "?!.", "<search> </search>"])
def test_empty_query_returns_nothing(retriever, query):
    assert retriever.search(query) == []


@pytest.mark.parametrize("query", ['born AND "x', "NOT near(", "a OR OR b", "born* ^ - :"])
def test_fts_syntax_in_queries_is_harmless(retriever, query):
    assert isinstance(retriever.search(query), list)


def test_k_and_top_k(retriever):
    assert len(retriever.search("born")) == retriever.top_k
    assert len(retriever.search("born", k=7)) == 7
    small = FTSRetriever(["a b", "a c", "a d"], top_k=2)
    assert len(small.search("a")) == 2


# --- bm25 against an independent implementation of FTS5's formula ------------------------------------

K1, B = 1.2, 0.75


def _tokens(text: str) -> list[str]:
    return re.findall(r"[a-z0-9]+", text.lower())


def _bm25(docs: list[str], query: str) -> list[float]:
    toks = [_tokens(d) for d in docs]
    n = len(docs)
    avgdl = sum(len(t) for t in toks) / n
    terms = set(_tokens(query))
    hits = {t: sum(t in d for d in toks) for t in terms}
    scores = []
    for d in toks:
        tf = Counter(d)
        score = 0.0
        for t in terms:
            if not tf[t]:
                continue
            idf = math.log((n - hits[t] + 0.5) / (hits[t] + 0.5))
            idf = idf if idf > 0 else 1e-6
            score += idf * tf[t] * (K1 + 1) / (tf[t] + K1 * (1 - B + B * len(d) / avgdl))
        scores.append(score)
    return scores


def _has_phrase(doc: str, query: str) -> bool:
    d, q = _tokens(doc), _tokens(query)
    return len(q) > 1 and any(d[i : i + len(q)] == q for i in range(len(d) - len(q) + 1))


def _check_order(docs: list[str], query: str, k: int):
    """Reference ranking: documents containing the query as a phrase first, then the rest, each by bm25."""
    got = FTSRetriever(docs, top_k=k).search(query)
    scores = _bm25(docs, query)
    key = {i: (not _has_phrase(docs[i], query), -scores[i]) for i in range(len(docs))}
    ranked = sorted((i for i, s in enumerate(scores) if s > 0), key=lambda i: (key[i], i))
    expected = [docs[i] for i in ranked[:k]]
    got_keys = [key[docs.index(d)] for d in got]
    # same tiers and scores in the same order; ties may differ only among equal keys
    assert [t for t, _ in got_keys] == [key[docs.index(d)][0] for d in expected]
    assert [s for _, s in got_keys] == pytest.approx([key[docs.index(d)][1] for d in expected], rel=1e-9)
    assert got_keys == sorted(got_keys)
    assert len(got) == len(expected)


def test_bm25_ordering_on_a_hand_made_corpus():
    docs = [
        "apple banana",
        "apple apple apple cherry",
        "banana cherry date elder fig grape",
        "cherry",
        "kiwi lemon",
        "apple",
    ]
    got = FTSRetriever(docs, top_k=3).search("apple")
    scores = _bm25(docs, "apple")
    assert got == [docs[i] for i in sorted(range(len(docs)), key=lambda i: -scores[i])[:3]]
    assert got[0] == "apple apple apple cherry"
    _check_order(docs, "banana cherry", 4)
    _check_order(docs, "kiwi apple", 6)


def test_bm25_ordering_on_the_world(world, facts):
    docs = [f["text"] for f in facts]
    rng = random.Random(1)
    vocab = sorted({w for d in docs for w in _tokens(d)})
    for _ in range(25):
        query = " ".join(rng.sample(vocab, rng.randint(1, 4)))
        _check_order(docs, query, 5)
    for person in world.people[:10]:
        _check_order(docs, f"{person} works for", 3)


@pytest.mark.parametrize("relation", ["born_in", "works_for", "mentor", "located_in", "headquartered_in"])
def test_gold_query_puts_the_gold_fact_first(world, retriever, relation):
    """The phrase tier: a query that is the fact's own opening words ranks that fact above bag-of-words ties."""
    for s in [s for (s, r) in world.facts if r == relation]:
        gold = RELATIONS[relation][0].format(s=s, o=world.facts[(s, relation)])
        assert retriever.search(RELATIONS[relation][1].format(s=s))[0] == gold, (relation, s)


def test_k_below_one_is_an_error(retriever):
    with pytest.raises(ValueError, match="k must be at least 1"):
        retriever.search("anything", k=0)


def test_repeated_queries_are_answered_from_memory_with_the_same_results(facts):
    r = FTSRetriever([f["text"] for f in facts], top_k=3)
    query = facts[0]["text"]
    first = r.search(query)
    r._db.execute("DELETE FROM docs")  # an emptied index can only answer a repeat from memory
    assert r.search(query.upper() + " ?") == first  # same normalised terms, same k
    assert r.search(query, k=2) == []  # another k is a new search
    first.clear()  # callers get copies
    assert len(r.search(query)) == 3
