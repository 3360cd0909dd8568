"""Imperfect demonstrations in the agent format, for the supervised warm start.

A demonstration walks the question's relation path with real searches, but before each hop it may
stop and guess an answer of the right type (`early_answer_prob`), and a query about a person may drop
the first name (`sloppy_query_prob`), which can retrieve the wrong person's fact. With
`early_answer_prob` above one half, guessing is the majority behaviour at every step, so even greedy
decoding of the warm-started policy is mediocre and RL has headroom.
"""

from __future__ import annotations

import json
import random

from arborl.components.config import WarmstartConfig
from arborl.components.envs.protocol import ANSWER_CLOSE, ANSWER_OPEN, SEARCH_CLOSE, SEARCH_OPEN, observation
from arborl.components.envs.retriever import FTSRetriever
from arborl.components.envs.world import RELATIONS, World

Segment = tuple[str, bool]  # (text, written by the model → trained on)


def demonstration(
    prompt_row: dict,
    retriever: FTSRetriever,
    fact_index: dict[str, tuple[str, str, str]],
    entities_by_type: dict[str, list[str]],
    rng: random.Random,
    early_answer_prob: float,
    sloppy_query_prob: float,
) -> list[Segment]:
    """One episode as segments: the prompt, then model turns and observations.

    `fact_index` maps a fact sentence to (subject, relation, object).
    """
    info = json.loads(prompt_row["extra_info"])
    path = info["path"]
    answer_type = RELATIONS[path[-1]][2]
    segments: list[Segment] = [(prompt_row["prompt"], False)]
    entity = info["subject"]
    for relation in path:
        if rng.random() < early_answer_prob:
            guess = rng.choice(entities_by_type[answer_type])
            segments.append((f" {ANSWER_OPEN} {guess} {ANSWER_CLOSE}", True))
            return segments
        about = entity
        if " " in entity and rng.random() < sloppy_query_prob:
            about = entity.split()[-1]
        query = RELATIONS[relation][1].format(s=about)
        docs = retriever.search(query)
        segments.append((f" {SEARCH_OPEN} {query} {SEARCH_CLOSE}", True))
        segments.append((observation(docs), False))
        parsed = [fact_index[d] for d in docs if d in fact_index]
        exact = [o for s, r, o in parsed if s == entity and r == relation]
        same_relation = [o for s, r, o in parsed if r == relation]
        if exact:
            entity = exact[0]
        elif same_relation:  # a sloppy query found somebody else's fact and the demonstrator believed it
            entity = same_relation[0]
        else:
            entity = rng.choice(entities_by_type[RELATIONS[relation][2]])
    segments.append((f" {ANSWER_OPEN} {entity} {ANSWER_CLOSE}", True))
    return segments


def build_demonstrations(
    world: World,
    retriever: FTSRetriever,
    questions: list[dict],
    warmstart: WarmstartConfig,
    seed: int,
    count: int | None = None,
) -> list[list[Segment]]:
    """The warm start's demonstrations: `count` (default `warmstart.num_demos`) episodes on questions drawn
    with replacement from `questions`, one seeded stream for the draws and the episodes, so a seed always
    gives the same list."""
    fact_index = {f["text"]: (f["subject"], f["relation"], f["object"]) for f in world.fact_rows()}
    entities_by_type = {kind: world.entities(kind) for kind in {t for _, _, t in RELATIONS.values()}}
    rng = random.Random(seed)
    return [
        demonstration(rng.choice(questions), retriever, fact_index, entities_by_type, rng,
                      warmstart.early_answer_prob, warmstart.sloppy_query_prob)
        for _ in range(warmstart.num_demos if count is None else count)
    ]


def gold_chain_tokens(world: World, retriever: FTSRetriever, questions: list[dict], tokenizer) -> float:
    """Mean generated tokens of a gold chain over `questions`: the demonstration that searches every hop with the
    full name and never guesses early, counted in `tokenizer`'s tokens over its model-written segments only."""
    if not questions:
        raise ValueError("gold chain tokens: no questions")
    fact_index = {f["text"]: (f["subject"], f["relation"], f["object"]) for f in world.fact_rows()}
    entities_by_type = {kind: world.entities(kind) for kind in {t for _, _, t in RELATIONS.values()}}
    rng = random.Random(0)  # unused: with both probabilities 0 a gold chain draws nothing
    total = 0
    for row in questions:
        segments = demonstration(row, retriever, fact_index, entities_by_type, rng, 0.0, 0.0)
        total += sum(len(tokenizer(text, add_special_tokens=False)["input_ids"]) for text, learn in segments if learn)
    return total / len(questions)
