"""A seeded synthetic world for multi-hop search: people, cities, countries, companies and relations.

Every relation is one fact sentence (the search tool's corpus). Questions follow relation paths of
1 to 4 hops. People are split into train / val / test *subjects*: a test question's subject never
appears as a subject of a training prompt or demonstration; every name part of a held-out person also
belongs to some training person, so no word of the test set is untrained.

Optional distractors (`world.distractors`) add people who share a first name or a surname with a real
person, and companies named like a real company with one more word in front, each with its own facts.
They are drawn from their own seeded stream after the real world is complete, so the real people, facts
and questions are those of the same world without distractors; distractors are never question subjects,
and no real fact points at one, so no answer is a distractor.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field

from arborl.components.config import WorldConfig
from arborl.components.envs.protocol import QUESTION_CLOSE, QUESTION_OPEN, words

DATA_SOURCE = "synthetic_kb"
ABILITY = "fact-reasoning"
# the word-level question prompt (`protocol.question_prompt`) as an `agent.prompt_template`
QUESTION_TEMPLATE = f"{QUESTION_OPEN} {{question}} {QUESTION_CLOSE}"

# relation -> (fact template, gold query: the fact's words up to the object, object type)
RELATIONS = {
    "born_in": ("{s} was born in {o} .", "{s} was born in", "city"),
    "works_for": ("{s} works for {o} .", "{s} works for", "company"),
    "mentor": ("the mentor of {s} is {o} .", "the mentor of {s}", "person"),
    "located_in": ("{s} is a city in {o} .", "{s} is a city in", "country"),
    "headquartered_in": ("{s} is headquartered in {o} .", "{s} is headquartered in", "city"),
}

# relation path -> question template over the subject person
QUESTIONS: dict[tuple[str, ...], str] = {
    ("born_in",): "where was {p} born ?",
    ("works_for",): "which company does {p} work for ?",
    ("mentor",): "who is the mentor of {p} ?",
    ("born_in", "located_in"): "in which country was {p} born ?",
    ("works_for", "headquartered_in"): "in which city is the company of {p} headquartered ?",
    ("mentor", "born_in"): "where was the mentor of {p} born ?",
    ("mentor", "works_for"): "which company does the mentor of {p} work for ?",
    ("works_for", "headquartered_in", "located_in"): "in which country is the company of {p} headquartered ?",
    ("mentor", "born_in", "located_in"): "in which country was the mentor of {p} born ?",
    ("mentor", "works_for", "headquartered_in"): "in which city is the company of the mentor of {p} headquartered ?",
    ("mentor", "works_for", "headquartered_in", "located_in"):
        "in which country is the company of the mentor of {p} headquartered ?",
    ("mentor", "mentor", "born_in", "located_in"): "in which country was the mentor of the mentor of {p} born ?",
    ("mentor", "mentor", "works_for", "headquartered_in"):
        "in which city is the company of the mentor of the mentor of {p} headquartered ?",
}
MAX_HOPS = max(len(path) for path in QUESTIONS)

_STOPWORDS = ("the", "of", "in", "is", "a", "for", "was", "born", "works", "mentor", "city", "company")
_ONSETS = ["b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "br", "dr", "kr", "st", "tr"]
_VOWELS = ["a", "e", "i", "o", "u", "ai", "ou"]
_CODAS = ["", "", "", "n", "r", "l", "s", "m", "k"]


def _pseudo_words(rng: random.Random, n: int, syllables: tuple[int, int], taken: set[str]) -> list[str]:
    out: list[str] = []
    while len(out) < n:
        k = rng.randint(*syllables)
        w = "".join(rng.choice(_ONSETS) + rng.choice(_VOWELS) for _ in range(k)) + rng.choice(_CODAS)
        if w not in taken:
            taken.add(w)
            out.append(w)
    return out


@dataclass
class World:
    people: list[str]
    cities: list[str]
    countries: list[str]
    companies: list[str]
    facts: dict[tuple[str, str], str]  # (subject, relation) -> object
    split_of: dict[str, str] = field(default_factory=dict)  # person -> train / val / test
    # distractor entities (their facts are in `facts` too); never question subjects or answers
    distractor_people: list[str] = field(default_factory=list)
    distractor_companies: list[str] = field(default_factory=list)

    def entities(self, kind: str) -> list[str]:
        """The real entities of a type (distractors excluded: they are never answers)."""
        return {"person": self.people, "city": self.cities, "country": self.countries, "company": self.companies}[kind]

    def fact_rows(self) -> list[dict]:
        rows = []
        for i, ((subject, relation), obj) in enumerate(sorted(self.facts.items())):
            template = RELATIONS[relation][0]
            rows.append(
                {"doc_id": i, "subject": subject, "relation": relation, "object": obj,
                 "text": template.format(s=subject, o=obj)}
            )
        return rows

    def to_json(self) -> dict:
        out = {"people": self.people, "cities": self.cities, "countries": self.countries,
               "companies": self.companies, "split_of": self.split_of}
        if self.distractor_people or self.distractor_companies:  # absent without distractors: world.json unchanged
            out.update(distractor_people=self.distractor_people, distractor_companies=self.distractor_companies)
        return out

    @classmethod
    def from_artifacts(cls, world_json: dict, fact_rows: list[dict]) -> World:
        """Rebuild a World from `world.json` and the rows of `facts.parquet` written by the prepare stage."""
        facts = {(f["subject"], f["relation"]): f["object"] for f in fact_rows}
        return cls(world_json["people"], world_json["cities"], world_json["countries"], world_json["companies"],
                   facts, world_json["split_of"], list(world_json.get("distractor_people", [])),
                   list(world_json.get("distractor_companies", [])))

    def follow(self, subject: str, path: tuple[str, ...]) -> list[str]:
        """Entities visited along `path` from `subject` (the last one is the answer)."""
        chain, node = [], subject
        for rel in path:
            node = self.facts[(node, rel)]
            chain.append(node)
        return chain


def build_world(cfg: WorldConfig, seed: int) -> World:
    rng = random.Random(seed)
    taken = set(_STOPWORDS)
    n_first = n_last = max(8, int((cfg.num_people * 1.5) ** 0.5) + 2)
    firsts = _pseudo_words(rng, n_first, (1, 2), taken)
    lasts = _pseudo_words(rng, n_last, (2, 2), taken)
    cities = _pseudo_words(rng, cfg.num_cities, (2, 3), taken)
    countries = _pseudo_words(rng, cfg.num_countries, (3, 3), taken)
    companies = _pseudo_words(rng, cfg.num_companies, (2, 2), taken)
    if n_first * n_last < cfg.num_people:
        raise ValueError(f"world.num_people={cfg.num_people} exceeds the {n_first * n_last} possible names")
    names = [f"{f} {last}" for f in firsts for last in lasts]
    rng.shuffle(names)
    people = names[: cfg.num_people]

    # Held-out subjects: only people whose first and last names both occur among the remaining people.
    order = people[:]
    rng.shuffle(order)
    n_test = int(round(cfg.num_people * cfg.test_people_fraction))
    n_val = int(round(cfg.num_people * cfg.val_people_fraction))
    split_of = {p: "train" for p in people}
    for split, n in (("test", n_test), ("val", n_val)):
        chosen = 0
        for p in order:
            if chosen == n:
                break
            if split_of[p] != "train":
                continue
            first, last = p.split()
            rest = [q for q in people if q != p and split_of[q] == "train"]
            if any(q.split()[0] == first for q in rest) and any(q.split()[1] == last for q in rest):
                split_of[p] = split
                chosen += 1

    facts: dict[tuple[str, str], str] = {}
    for p in people:
        facts[(p, "born_in")] = rng.choice(cities)
        facts[(p, "works_for")] = rng.choice(companies)
        facts[(p, "mentor")] = rng.choice([q for q in people if q != p])
    for c in cities:
        facts[(c, "located_in")] = rng.choice(countries)
    for co in companies:
        facts[(co, "headquartered_in")] = rng.choice(cities)
    world = World(people, cities, countries, companies, facts, split_of)
    if cfg.distractors > 0:
        add_distractors(world, cfg.distractors, seed)
    return world


def add_distractors(world: World, per_entity: float, seed: int) -> None:
    """Add `per_entity` distractor people per real person and distractor companies per real company, with
    their facts, to `world` (from a stream of their own, so the real world does not change).

    Each real person in turn (shuffled) anchors one distractor with the anchor's surname: every other one
    takes the first name of a real person too, while one is free with that surname (so a query that keeps
    only the first name or only the surname can hit it), the rest a new first name. A distractor company is
    a new word followed by a real company's name. A distractor person is born in a real city, works for a
    real or distractor company and has a real or distractor mentor; a distractor company is headquartered
    in a real city."""
    rng = random.Random(f"{seed}-distractors")
    taken = set(_STOPWORDS)
    for name in world.people + world.cities + world.countries + world.companies:
        taken.update(name.split())
    n_people = int(round(per_entity * len(world.people)))
    n_companies = int(round(per_entity * len(world.companies)))
    real_firsts = sorted({p.split()[0] for p in world.people})
    new_firsts = _pseudo_words(rng, max(4, int(n_people ** 0.5)), (1, 2), taken)

    names = set(world.people)
    anchors = world.people[:]
    rng.shuffle(anchors)
    people: list[str] = []
    for i in range(n_people):
        last = anchors[i % len(anchors)].split()[1]
        free = [f for f in real_firsts if f"{f} {last}" not in names] if i % 2 == 0 else []
        if not free:
            free = [f for f in new_firsts if f"{f} {last}" not in names]
        if not free:  # a new first name always gives a new name
            new_firsts += _pseudo_words(rng, 1, (1, 2), taken)
            free = new_firsts[-1:]
        name = f"{rng.choice(free)} {last}"
        names.add(name)
        people.append(name)

    real_companies = world.companies[:]
    rng.shuffle(real_companies)
    prefixes = _pseudo_words(rng, n_companies, (2, 2), taken)
    companies = [f"{prefix} {real_companies[i % len(real_companies)]}" for i, prefix in enumerate(prefixes)]

    everyone = world.people + people
    for p in people:
        world.facts[(p, "born_in")] = rng.choice(world.cities)
        world.facts[(p, "works_for")] = rng.choice(world.companies + companies)
        mentor = rng.choice(everyone)
        while mentor == p:
            mentor = rng.choice(everyone)
        world.facts[(p, "mentor")] = mentor
    for co in companies:
        world.facts[(co, "headquartered_in")] = rng.choice(world.cities)
    world.distractor_people = people
    world.distractor_companies = companies


def make_questions(world: World, cfg: WorldConfig, seed: int, split: str, n: int,
                   prompt_template: str = QUESTION_TEMPLATE) -> list[dict]:
    """`n` prompt rows (the prompts schema of docs/design.md, Data contracts) whose subjects are people of `split`.

    Each question is one user message: `prompt_template` with `{question}` replaced by the question's words."""
    rng = random.Random(f"{seed}-{split}")
    subjects = sorted(p for p, s in world.split_of.items() if s == split)
    if not subjects:
        raise ValueError(f"no people in split {split!r}; raise world.num_people or the split fractions")
    hops = sorted(cfg.hop_mix)
    weights = [cfg.hop_mix[h] for h in hops]
    paths_by_hops = {h: [p for p in QUESTIONS if len(p) == h] for h in hops}
    rows, seen = [], set()
    tries = 0
    while len(rows) < n:
        tries += 1
        h = rng.choices(hops, weights)[0]
        path = rng.choice(paths_by_hops[h])
        subject = rng.choice(subjects)
        if (subject, path) in seen and tries < 50 * n:
            continue
        seen.add((subject, path))
        chain = world.follow(subject, path)
        question = QUESTIONS[path].format(p=subject)
        content = prompt_template.format(question=" ".join(words(question)))
        rows.append(
            {
                "prompt_id": f"{split}-{len(rows):05d}",
                "data_source": DATA_SOURCE,
                "prompt": content,
                "messages": json.dumps([{"role": "user", "content": content}]),
                "ability": ABILITY,
                "reward_model": json.dumps({"style": "rule", "ground_truth": {"target": [chain[-1]]}}),
                "ground_truth": [chain[-1]],
                "split": split,
                "extra_info": json.dumps(
                    {"hops": h, "subject": subject, "path": list(path), "chain": chain, "question": question}
                ),
            }
        )
    return rows


def vocabulary(world: World) -> list[str]:
    """Every word the world can produce: fact sentences, questions, name parts (sorted, deterministic)."""
    from arborl.components.envs.protocol import words

    vocab: set[str] = set()
    for row in world.fact_rows():
        vocab.update(words(row["text"]))
    for template in QUESTIONS.values():
        vocab.update(words(template.format(p="")))
    for _, query, _ in RELATIONS.values():
        vocab.update(words(query.format(s="")))
    for name in (world.people + world.cities + world.countries + world.companies + world.distractor_people
                 + world.distractor_companies):
        vocab.update(words(name))
    return sorted(vocab)
