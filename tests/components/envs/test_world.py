"""components.envs.world: seeded knowledge base, subject-disjoint splits, questions, vocabulary."""

from __future__ import annotations

import hashlib
import json
from collections import Counter

import pytest

from arborl.components.artifacts import schemas
from arborl.components.config import Config, WorldConfig, load_config
from arborl.components.envs.corpus import export_corpus
from arborl.components.envs.demos import build_demonstrations
from arborl.components.envs.protocol import TAGS, words
from arborl.components.envs.retriever import FTSRetriever
from arborl.components.envs.world import (
    MAX_HOPS,
    QUESTIONS,
    RELATIONS,
    World,
    build_world,
    make_questions,
    vocabulary,
)
from arborl.components.stages.prepare import prepare_world
from arborl.components.training.models import build_tokenizer, encode

SEED = 0


def test_build_world_is_deterministic_per_seed(world_cfg):
    a, b, c = build_world(world_cfg, 3), build_world(world_cfg, 3), build_world(world_cfg, 4)
    assert (a.people, a.cities, a.countries, a.companies, a.facts, a.split_of) == (
        b.people, b.cities, b.countries, b.companies, b.facts, b.split_of)
    assert a.people != c.people or a.facts != c.facts
    assert make_questions(a, world_cfg, 3, "train", 20) == make_questions(b, world_cfg, 3, "train", 20)


def test_world_sizes_and_fact_coverage(world, world_cfg):
    assert len(world.people) == len(set(world.people)) == world_cfg.num_people
    assert len(world.cities) == world_cfg.num_cities
    assert len(world.countries) == world_cfg.num_countries
    assert len(world.companies) == world_cfg.num_companies
    all_names = world.people + world.cities + world.countries + world.companies
    assert len(set(all_names)) == len(all_names)
    for p in world.people:
        assert world.facts[(p, "born_in")] in world.cities
        assert world.facts[(p, "works_for")] in world.companies
        assert world.facts[(p, "mentor")] in world.people and world.facts[(p, "mentor")] != p
    for c in world.cities:
        assert world.facts[(c, "located_in")] in world.countries
    for co in world.companies:
        assert world.facts[(co, "headquartered_in")] in world.cities
    assert len(world.facts) == 3 * len(world.people) + len(world.cities) + len(world.companies)


def test_split_sizes(world, world_cfg):
    counts = Counter(world.split_of.values())
    assert counts["test"] == round(world_cfg.num_people * world_cfg.test_people_fraction)
    assert counts["val"] == round(world_cfg.num_people * world_cfg.val_people_fraction)
    assert counts["train"] == world_cfg.num_people - counts["test"] - counts["val"]


def test_fact_rows(world):
    rows = world.fact_rows()
    assert [r["doc_id"] for r in rows] == list(range(len(world.facts)))
    for r in rows:
        assert world.facts[(r["subject"], r["relation"])] == r["object"]
        assert r["text"] == RELATIONS[r["relation"]][0].format(s=r["subject"], o=r["object"])
        assert r["subject"] in r["text"] and r["object"] in r["text"]


def test_held_out_subjects_never_are_train_subjects(world, questions):
    train_subjects = {json.loads(q["extra_info"])["subject"] for q in questions["train"]}
    for split in ("val", "test"):
        subjects = {json.loads(q["extra_info"])["subject"] for q in questions[split]}
        assert subjects, split
        assert not subjects & train_subjects
        assert all(world.split_of[s] == split for s in subjects)
    assert all(world.split_of[s] == "train" for s in train_subjects)


def test_held_out_name_parts_occur_in_train_names(world):
    train = [p.split() for p, s in world.split_of.items() if s == "train"]
    first_names = {f for f, _ in train}
    last_names = {last for _, last in train}
    held_out = [p for p, s in world.split_of.items() if s != "train"]
    assert held_out
    for p in held_out:
        first, last = p.split()
        assert first in first_names, p
        assert last in last_names, p


@pytest.mark.parametrize("seed", [0, 1, 2, 7])
def test_name_parts_hold_for_other_seeds_and_sizes(seed):
    cfg = WorldConfig(num_people=40, test_people_fraction=0.3, val_people_fraction=0.2)
    w = build_world(cfg, seed)
    train = [p.split() for p, s in w.split_of.items() if s == "train"]
    for p, s in w.split_of.items():
        if s != "train":
            assert p.split()[0] in {f for f, _ in train} and p.split()[1] in {la for _, la in train}


def test_ground_truth_follows_the_facts(world, questions):
    for split, rows in questions.items():
        for q in rows:
            info = json.loads(q["extra_info"])
            node = info["subject"]
            chain = []
            for rel in info["path"]:
                node = world.facts[(node, rel)]
                chain.append(node)
            assert q["ground_truth"] == [chain[-1]]
            assert info["chain"] == chain
            assert info["hops"] == len(info["path"])
            assert tuple(info["path"]) in QUESTIONS
            assert q["split"] == split
            assert q["prompt"] == f"<question> {' '.join(words(info['question']))} </question>"
            assert info["subject"] in q["prompt"]


def test_prompt_ids_are_unique_and_counts_match(questions, world_cfg):
    ids = [q["prompt_id"] for rows in questions.values() for q in rows]
    assert len(ids) == len(set(ids))
    assert len(questions["train"]) == world_cfg.num_train
    assert len(questions["test"]) == world_cfg.num_test


def test_hop_mix_is_respected(world):
    cfg = WorldConfig(num_people=60, hop_mix={2: 1.0})
    rows = make_questions(world, cfg, 0, "train", 30)
    assert {json.loads(r["extra_info"])["hops"] for r in rows} == {2}


def test_unknown_split_is_an_error(world, world_cfg):
    with pytest.raises(ValueError, match="nosuch"):
        make_questions(world, world_cfg, 0, "nosuch", 3)


def test_vocabulary_covers_facts_prompts_queries_and_answers(world, questions):
    vocab = set(vocabulary(world))
    assert vocabulary(world) == sorted(vocab)
    for row in world.fact_rows():
        assert set(words(row["text"])) <= vocab, row["text"]
    for rows in questions.values():
        for q in rows:
            assert set(words(q["prompt"])) - set(TAGS) <= vocab, q["prompt"]
            assert set(words(q["ground_truth"][0])) <= vocab
    for (subject, relation) in world.facts:
        assert set(words(RELATIONS[relation][1].format(s=subject))) <= vocab


def test_tokenizer_has_no_unknown_words_for_the_world(world, questions, tokenizer):
    texts = [r["text"] for r in world.fact_rows()] + [q["prompt"] for rows in questions.values() for q in rows]
    for text in texts:
        ids = encode(tokenizer, " ".join(words(text)))
        assert tokenizer.unk_token_id not in ids, text
        assert len(ids) == len(words(text))
    # and a word outside the world is unknown
    assert encode(build_tokenizer(vocabulary(world)), "qqqqzzz") == [tokenizer.unk_token_id]


# --- the default worlds stay as they were -------------------------------------------------------------------------

# sha256 of `_fingerprint` for configs/tiny.yaml and configs/micro.yaml, computed with the code as it was before
# 4-hop questions and distractors were added (the same function run against a copy of that tree). A change here
# means the default worlds' facts, prompts, entities, vocabulary or demonstrations changed.
DEFAULT_WORLD_FINGERPRINTS = {
    "tiny": "d35c765ffe901d30d35e7b3c34838accbee78489cda2b9d4d0af8aba22be49a7",
    "micro": "d45a6e133e09b48ed15684f79339270db9d9576cc7cd0c0e19fe1eba645b9412",
}


def _fingerprint(cfg) -> str:
    world = build_world(cfg.world, cfg.run.seed)
    facts = world.fact_rows()
    prompts = {split: make_questions(world, cfg.world, cfg.run.seed, split, n, cfg.agent.prompt_template)
               for split, n in (("train", cfg.world.num_train), ("val", cfg.world.num_val),
                                ("test", cfg.world.num_test))}
    retriever = FTSRetriever([f["text"] for f in facts], top_k=cfg.search.topk)
    demos = build_demonstrations(world, retriever, prompts["train"], cfg.warmstart, cfg.run.seed, count=64)
    payload = {"facts": facts, "world": world.to_json(), "prompts": prompts, "vocabulary": vocabulary(world),
               "demos": demos}
    return hashlib.sha256(json.dumps(payload).encode()).hexdigest()


@pytest.mark.parametrize("name", sorted(DEFAULT_WORLD_FINGERPRINTS))
def test_default_worlds_are_unchanged(repo_root, name):
    cfg = load_config(repo_root / "configs" / f"{name}.yaml")
    assert cfg.world.distractors == 0 and 4 not in cfg.world.hop_mix
    assert _fingerprint(cfg) == DEFAULT_WORLD_FINGERPRINTS[name]


# --- 4-hop questions and distractors -------------------------------------------------------------------------------

HARD_WORLD = WorldConfig(num_people=200, num_cities=20, num_countries=6, num_companies=15, distractors=1.0,
                         hop_mix={1: 0.1, 2: 0.2, 3: 0.35, 4: 0.35}, num_train=200, num_val=20, num_test=60)


@pytest.fixture(scope="module")
def hard_world():
    return build_world(HARD_WORLD, SEED)


@pytest.fixture(scope="module")
def hard_facts(hard_world):
    return hard_world.fact_rows()


@pytest.fixture(scope="module")
def hard_retriever(hard_facts):
    return FTSRetriever([f["text"] for f in hard_facts], top_k=1)


@pytest.fixture(scope="module")
def hard_questions(hard_world):
    return {split: make_questions(hard_world, HARD_WORLD, SEED, split, n)
            for split, n in (("train", HARD_WORLD.num_train), ("val", HARD_WORLD.num_val),
                             ("test", HARD_WORLD.num_test))}


def _subject_of(retriever, facts_by_text, query):
    docs = retriever.search(query)
    assert len(docs) == 1, query
    return facts_by_text[docs[0]]


def test_hop_mix_accepts_four_and_rejects_five():
    assert WorldConfig(hop_mix={4: 1.0}).hop_mix == {4: 1.0}
    with pytest.raises(ValueError, match="1, 2, 3 or 4"):
        WorldConfig(hop_mix={5: 1.0})
    assert MAX_HOPS == 4
    assert {len(p) for p in QUESTIONS} == {1, 2, 3, 4}


def test_four_hop_gold_chains_are_answerable_by_following_the_facts(hard_world, hard_facts, hard_retriever):
    cfg = HARD_WORLD.model_copy(update={"hop_mix": {4: 1.0}})
    rows = make_questions(hard_world, cfg, SEED, "train", 60)
    by_text = {f["text"]: f for f in hard_facts}
    assert {tuple(json.loads(r["extra_info"])["path"]) for r in rows} == {p for p in QUESTIONS if len(p) == 4}
    for row in rows:
        info = json.loads(row["extra_info"])
        assert info["hops"] == 4 and len(info["chain"]) == 4
        node = info["subject"]
        for relation, expected in zip(info["path"], info["chain"], strict=True):
            # the precise (gold) query's single search result is the fact that leads to the next entity
            fact = _subject_of(hard_retriever, by_text, RELATIONS[relation][1].format(s=node))
            assert (fact["subject"], fact["relation"], fact["object"]) == (node, relation, expected)
            node = expected
        assert row["ground_truth"] == [node]
        assert node in hard_world.entities(RELATIONS[info["path"][-1]][2])


def test_distractor_names_collide_with_real_names(hard_world):
    people, companies = hard_world.distractor_people, hard_world.distractor_companies
    assert len(people) == round(HARD_WORLD.distractors * HARD_WORLD.num_people)
    assert len(companies) == round(HARD_WORLD.distractors * HARD_WORLD.num_companies)
    real_firsts = {p.split()[0] for p in hard_world.people}
    real_lasts = {p.split()[1] for p in hard_world.people}
    everything = hard_world.people + hard_world.cities + hard_world.countries + hard_world.companies
    assert len(set(people + companies + everything)) == len(people) + len(companies) + len(everything)
    assert all(p.split()[1] in real_lasts for p in people)
    # every other one also has a real person's first name (while one is free with that surname): 89 of 200 here
    assert sum(p.split()[0] in real_firsts for p in people) >= 0.4 * len(people)
    assert all(len(c.split()) == 2 and c.split()[1] in hard_world.companies for c in companies)
    assert sorted(c.split()[1] for c in companies) == sorted(hard_world.companies)  # one near-twin each


def test_distractors_have_facts_but_are_never_subjects_or_answers(hard_world, hard_questions):
    people, companies = set(hard_world.distractor_people), set(hard_world.distractor_companies)
    for p in people:
        assert hard_world.facts[(p, "born_in")] in hard_world.cities
        assert hard_world.facts[(p, "works_for")] in set(hard_world.companies) | companies
        assert hard_world.facts[(p, "mentor")] != p
    for c in companies:
        assert hard_world.facts[(c, "headquartered_in")] in hard_world.cities
    assert not people & set(hard_world.split_of)
    for (subject, _), obj in hard_world.facts.items():
        if subject not in people and subject not in companies:
            assert obj not in people and obj not in companies, (subject, obj)
    for rows in hard_questions.values():
        for q in rows:
            info = json.loads(q["extra_info"])
            assert info["subject"] in hard_world.split_of
            assert not set(info["chain"]) & (people | companies)
    assert {json.loads(q["extra_info"])["hops"] for q in hard_questions["train"]} == {1, 2, 3, 4}


def test_distractors_leave_the_real_world_and_its_questions_unchanged(hard_world, hard_questions):
    plain = build_world(HARD_WORLD.model_copy(update={"distractors": 0.0}), SEED)
    assert (plain.people, plain.cities, plain.countries, plain.companies, plain.split_of) == (
        hard_world.people, hard_world.cities, hard_world.countries, hard_world.companies, hard_world.split_of)
    assert plain.facts == {k: v for k, v in hard_world.facts.items() if k[0] not in
                           set(hard_world.distractor_people) | set(hard_world.distractor_companies)}
    assert make_questions(plain, HARD_WORLD, SEED, "test", HARD_WORLD.num_test) == hard_questions["test"]
    assert not plain.distractor_people and "distractor_people" not in plain.to_json()


def test_distractor_facts_are_indexed_and_found_by_a_precise_query(hard_world, hard_facts, hard_retriever):
    by_text = {f["text"]: f for f in hard_facts}
    distractors = set(hard_world.distractor_people) | set(hard_world.distractor_companies)
    rows = [f for f in hard_facts if f["subject"] in distractors]
    assert len(rows) == 3 * len(hard_world.distractor_people) + len(hard_world.distractor_companies)
    for f in rows:
        assert _subject_of(hard_retriever, by_text, RELATIONS[f["relation"]][1].format(s=f["subject"])) == f


def test_precise_queries_find_the_real_fact_and_sloppy_ones_a_distractor(hard_world, hard_facts, hard_retriever):
    """With topk=1 a query with the full name returns the person's own fact; dropping the first name (the warm
    start's sloppy query) returns the first of everybody with that surname, often a distractor (measured at
    seed 0: 48% of the 600 person facts; 95% are somebody else's)."""
    by_text = {f["text"]: f for f in hard_facts}
    distractors = set(hard_world.distractor_people)
    to_distractor = to_other = total = 0
    for p in hard_world.people:
        for relation in ("born_in", "works_for", "mentor"):
            precise = _subject_of(hard_retriever, by_text, RELATIONS[relation][1].format(s=p))
            assert (precise["subject"], precise["relation"]) == (p, relation)
            sloppy = _subject_of(hard_retriever, by_text, RELATIONS[relation][1].format(s=p.split()[1]))
            to_distractor += sloppy["subject"] in distractors
            to_other += sloppy["subject"] != p
            total += 1
    assert to_distractor / total > 0.3
    assert to_other / total > 0.8
    # a real company's fact outranks its (one) near-twin's, which contains the same phrase
    for twin in hard_world.distractor_companies:
        real = twin.split()[1]
        query = RELATIONS["headquartered_in"][1].format(s=real)
        assert _subject_of(hard_retriever, by_text, query)["subject"] == real
        assert [by_text[d]["subject"] for d in hard_retriever.search(query, k=2)] == [real, twin]


def test_world_with_distractors_round_trips_through_prepare_and_exports_them(tmp_path, hard_world):
    cfg = Config(world=HARD_WORLD)
    out = tmp_path / "prepare"
    prepare_world(cfg, {}, str(out))
    world_json = json.loads((out / schemas.WORLD_FILE).read_text())
    facts = schemas.read(str(out / schemas.FACTS_FILE), schemas.FACTS).to_pylist()
    rebuilt = World.from_artifacts(world_json, facts)
    assert rebuilt.distractor_people == hard_world.distractor_people
    assert rebuilt.distractor_companies == hard_world.distractor_companies
    assert rebuilt.facts == hard_world.facts
    assert vocabulary(rebuilt) == vocabulary(hard_world)
    assert {w for d in hard_world.distractor_people + hard_world.distractor_companies for w in d.split()} <= set(
        vocabulary(hard_world))
    corpus = tmp_path / "corpus.jsonl"
    assert export_corpus(str(out), str(corpus)) == len(hard_world.facts)
    contents = [json.loads(line)["contents"] for line in corpus.read_text().splitlines()]
    twin = hard_world.distractor_people[0]
    assert f"{twin} was born in {hard_world.facts[(twin, 'born_in')]} ." in contents
