"""components.envs.demos: imperfect demonstrations in the agent format."""

from __future__ import annotations

import json
import random

import pytest

from arborl.components.config import WarmstartConfig, WorldConfig
from arborl.components.envs.demos import build_demonstrations, demonstration
from arborl.components.envs.protocol import (
    ANSWER_OPEN,
    INFO_OPEN,
    SEARCH_OPEN,
    extract_answer,
    is_valid_sequence,
    search_query,
)
from arborl.components.envs.retriever import FTSRetriever
from arborl.components.envs.world import RELATIONS, build_world, make_questions


def _all_questions(questions):
    return [q for rows in questions.values() for q in rows]


def _demo(q, retriever, fact_index, entities_by_type, seed, early, sloppy):
    return demonstration(q, retriever, fact_index, entities_by_type, random.Random(seed), early, sloppy)


def _answer(segments) -> str | None:
    return extract_answer(segments[-1][0])


def _check_structure(q, segments):
    assert segments[0] == (q["prompt"], False)
    body = segments[1:]
    assert body, "a demonstration has at least one model turn"
    # model turns and observations alternate: (search, observation)* then one answer
    for i, (text, trainable) in enumerate(body):
        if i % 2 == 0:
            assert trainable, text
            last = i == len(body) - 1
            assert text.startswith(f" {ANSWER_OPEN if last else SEARCH_OPEN} "), text
        else:
            assert not trainable, text
            assert text.startswith(f" {INFO_OPEN}"), text
    assert len(body) % 2 == 1
    response = "".join(text for text, _ in body)
    assert is_valid_sequence(response) == (True, "ok"), response


@pytest.mark.parametrize(("early", "sloppy"), [(0.0, 0.0), (0.5, 0.5), (1.0, 0.0), (0.0, 1.0)])
def test_demonstrations_alternate_turns_and_observations_in_valid_format(
    questions, retriever, fact_index, entities_by_type, early, sloppy
):
    for i, q in enumerate(_all_questions(questions)):
        _check_structure(q, _demo(q, retriever, fact_index, entities_by_type, i, early, sloppy))


def test_noise_free_demo_searches_every_hop(questions, retriever, fact_index, entities_by_type):
    for i, q in enumerate(_all_questions(questions)):
        info = json.loads(q["extra_info"])
        segments = _demo(q, retriever, fact_index, entities_by_type, i, 0.0, 0.0)
        searches = [t for t, trainable in segments[1:] if trainable and t.startswith(f" {SEARCH_OPEN}")]
        assert len(searches) == info["hops"]
        # the first query is the gold query about the subject
        assert searches[0] == f" {SEARCH_OPEN} {RELATIONS[info['path'][0]][1].format(s=info['subject'])} </search>"


def test_noise_free_demo_is_right_when_no_hop_is_a_mentor_hop(questions, retriever, fact_index, entities_by_type):
    checked = 0
    for i, q in enumerate(_all_questions(questions)):
        if "mentor" in json.loads(q["extra_info"])["path"]:
            continue
        checked += 1
        assert _answer(_demo(q, retriever, fact_index, entities_by_type, i, 0.0, 0.0)) == q["ground_truth"][0]
    assert checked >= 20


def test_noise_free_demo_answers_most_questions_correctly(questions, retriever, fact_index, entities_by_type):
    rows = _all_questions(questions)
    right = sum(
        _answer(_demo(q, retriever, fact_index, entities_by_type, i, 0.0, 0.0)) == q["ground_truth"][0]
        for i, q in enumerate(rows)
    )
    assert right / len(rows) >= 0.95


def test_early_answer_always_gives_a_single_answer_turn(questions, retriever, fact_index, entities_by_type, world):
    for i, q in enumerate(_all_questions(questions)):
        segments = _demo(q, retriever, fact_index, entities_by_type, i, 1.0, 0.0)
        assert len(segments) == 2
        text, trainable = segments[1]
        assert trainable and text.startswith(f" {ANSWER_OPEN} ")
        answer_type = RELATIONS[json.loads(q["extra_info"])["path"][-1]][2]
        assert _answer(segments) in world.entities(answer_type)


def test_early_answer_rate_roughly_matches_probability(questions, retriever, fact_index, entities_by_type):
    rows = [q for q in _all_questions(questions)]
    immediate = sum(
        len(_demo(q, retriever, fact_index, entities_by_type, i, 0.5, 0.0)) == 2 for i, q in enumerate(rows)
    )
    assert 0.3 < immediate / len(rows) < 0.7


def test_sloppy_queries_drop_the_first_name(questions, retriever, fact_index, entities_by_type):
    for i, q in enumerate(_all_questions(questions)):
        info = json.loads(q["extra_info"])
        segments = _demo(q, retriever, fact_index, entities_by_type, i, 0.0, 1.0)
        first_query = segments[1][0]
        last_name = info["subject"].split()[-1]
        assert first_query == f" {SEARCH_OPEN} {RELATIONS[info['path'][0]][1].format(s=last_name)} </search>"


def test_demonstrations_are_reproducible(questions, retriever, fact_index, entities_by_type):
    q = questions["train"][0]
    a = _demo(q, retriever, fact_index, entities_by_type, 5, 0.5, 0.5)
    b = _demo(q, retriever, fact_index, entities_by_type, 5, 0.5, 0.5)
    assert a == b


def test_observations_are_the_retrieved_documents(questions, retriever, fact_index, entities_by_type):
    from arborl.components.envs.protocol import observation, search_query

    q = questions["train"][3]
    segments = _demo(q, retriever, fact_index, entities_by_type, 0, 0.0, 0.0)
    for (turn, _), (obs, _) in zip(segments[1::2], segments[2::2], strict=False):
        assert obs == observation(retriever.search(search_query(turn)))


def test_build_demonstrations_is_seeded_and_honours_the_count(world, questions, retriever):
    ws = WarmstartConfig(num_demos=7, early_answer_prob=0.5, sloppy_query_prob=0.5)
    train = questions["train"]
    first = build_demonstrations(world, retriever, train, ws, seed=3)
    assert len(first) == 7
    assert build_demonstrations(world, retriever, train, ws, seed=3) == first
    assert len(build_demonstrations(world, retriever, train, ws, seed=3, count=12)) == 12
    assert build_demonstrations(world, retriever, train, ws, seed=3, count=4) == first[:4]  # one stream, in order
    assert build_demonstrations(world, retriever, train, ws, seed=4) != first


def test_build_demonstrations_draws_questions_and_episodes_from_one_stream(
    world, questions, retriever, fact_index, entities_by_type
):
    ws = WarmstartConfig(num_demos=9, early_answer_prob=0.3, sloppy_query_prob=0.4)
    train = questions["train"]
    rng = random.Random(11)
    expected = [demonstration(rng.choice(train), retriever, fact_index, entities_by_type, rng, 0.3, 0.4)
                for _ in range(9)]
    assert build_demonstrations(world, retriever, train, ws, seed=11) == expected


# --- 4-hop chains in a world with distractors ----------------------------------------------------------------------

FOUR_HOP_WORLD = WorldConfig(num_people=120, num_cities=12, num_countries=5, num_companies=10, distractors=1.0,
                             hop_mix={4: 1.0}, num_train=60, num_val=10, num_test=20)


@pytest.fixture(scope="module")
def four_hop():
    """(questions, retriever with topk=1, fact index, entities by type) of a 4-hop world with distractors."""
    world = build_world(FOUR_HOP_WORLD, 0)
    facts = world.fact_rows()
    retriever = FTSRetriever([f["text"] for f in facts], top_k=1)
    fact_index = {f["text"]: (f["subject"], f["relation"], f["object"]) for f in facts}
    entities = {kind: world.entities(kind) for kind in {t for _, _, t in RELATIONS.values()}}
    return make_questions(world, FOUR_HOP_WORLD, 0, "train", FOUR_HOP_WORLD.num_train), retriever, fact_index, \
        entities


def test_noise_free_demos_walk_all_four_hops_to_the_gold_answer(four_hop):
    questions, retriever, fact_index, entities = four_hop
    for i, q in enumerate(questions):
        info = json.loads(q["extra_info"])
        assert info["hops"] == 4
        segments = _demo(q, retriever, fact_index, entities, i, 0.0, 0.0)
        _check_structure(q, segments)
        searches = [search_query(t) for t, trainable in segments[1:] if trainable and t.startswith(f" {SEARCH_OPEN}")]
        entities_queried = [info["subject"]] + info["chain"][:-1]
        assert searches == [RELATIONS[r][1].format(s=e) for r, e in zip(info["path"], entities_queried, strict=True)]
        assert _answer(segments) == q["ground_truth"][0]


def test_four_hop_demos_with_noise_stay_valid_and_rarely_finish(four_hop):
    questions, retriever, fact_index, entities = four_hop
    finished = right = 0
    for i, q in enumerate(questions * 5):
        segments = _demo(q, retriever, fact_index, entities, i, 0.6, 0.3)
        _check_structure(q, segments)
        finished += len(segments) == 2 + 2 * 4  # prompt, 4 × (search, observation), answer
        right += _answer(segments) == q["ground_truth"][0]
    assert finished / (5 * len(questions)) < 0.1  # 0.4^4 ≈ 2.6% in expectation
    assert right < 0.2 * 5 * len(questions)


def test_sloppy_four_hop_demos_drop_the_first_name_of_every_person_they_query(four_hop):
    questions, retriever, fact_index, entities = four_hop
    for i, q in enumerate(questions):
        segments = _demo(q, retriever, fact_index, entities, i, 0.0, 1.0)
        _check_structure(q, segments)
        for turn, _ in segments[1:-1:2]:
            query = search_query(turn)
            person_query = query.startswith("the mentor of ") or " was born in" in query or " works for" in query
            if person_query:  # a person's name is two words; the sloppy query keeps the surname only
                about = query.removeprefix("the mentor of ").split(" was born in")[0].split(" works for")[0]
                assert len(about.split()) == 1, query


def test_gold_chain_tokens_count_the_model_words_of_noise_free_chains(world, questions, retriever, fact_index,
                                                                      entities_by_type):
    """The `gold` chain unit: with the world's word-level tokenizer a token is a word (tags included), so the unit
    is the mean number of words the model writes in a noise-free demonstration: one search per hop, then the answer."""
    from arborl.components.envs.demos import gold_chain_tokens
    from arborl.components.envs.world import vocabulary
    from arborl.components.training.models import build_tokenizer

    rows = questions["val"]
    expected = []
    for q in rows:
        segments = _demo(q, retriever, fact_index, entities_by_type, 0, 0.0, 0.0)
        written = [text for text, trainable in segments if trainable]
        assert len(written) == json.loads(q["extra_info"])["hops"] + 1
        expected.append(sum(len(text.split()) for text in written))
    unit = gold_chain_tokens(world, retriever, rows, build_tokenizer(vocabulary(world)))
    assert unit == pytest.approx(sum(expected) / len(expected))
    with pytest.raises(ValueError, match="no questions"):
        gold_chain_tokens(world, retriever, [], build_tokenizer(vocabulary(world)))
