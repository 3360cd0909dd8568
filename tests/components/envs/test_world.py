"""components.envs.world: seeded knowledge base, subject-disjoint splits, questions, vocabulary."""

from __future__ import annotations

import json
from collections import Counter

import pytest

from arborl.components.config import WorldConfig
from arborl.components.envs.protocol import TAGS, words
from arborl.components.envs.world import QUESTIONS, RELATIONS, build_world, make_questions, vocabulary
from arborl.components.models import build_tokenizer, encode


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
