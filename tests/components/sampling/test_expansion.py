"""components.sampling.expansion: each policy does what it promises, on hand-made trees and real ones."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from arborl.components.config import AgentConfig, SamplingConfig
from arborl.components.sampling.agent import SearchEnv, Step
from arborl.components.sampling.engine import HFBackend
from arborl.components.sampling.expansion import DepthStratifiedPolicy, EntropyPolicy, RandomPolicy, make_policy
from arborl.components.sampling.scheduler import sample_trees
from arborl.components.sampling.tree import ROOT, Tree
from arborl.components.training.models import prompt_ids


def _step(logprobs, leaf=False):
    n = len(logprobs)
    return Step(list(range(10, 10 + n)), list(logprobs), "", "answer" if leaf else "search",
                [] if leaf else [7], "", "answer" if leaf else None)


def _tree() -> Tree:
    """Non-leaf nodes 0 (depth 1), 1 (depth 2), 2 (depth 3), 4 (depth 2); leaves 3, 5, 6.

    Node 1 holds one very surprising token (−log p = 5); node 4 the highest mean surprisal (2.5)."""
    t = Tree("p", 0, [1])
    t.attach(ROOT, [_step([-0.1, -0.2]), _step([-0.1, -5.0, -0.1]), _step([-0.3]), _step([-0.2], leaf=True)], 0)
    t.attach(0, [_step([-2.5, -2.5]), _step([-0.1], leaf=True)], 1)
    t.attach(ROOT, [_step([-0.4], leaf=True)], 1)
    return t


def test_hand_tree_layout():
    t = _tree()
    assert t.expandable() == [ROOT, 0, 1, 2, 4]
    assert {n.node_id: n.depth for n in t.nodes if not n.is_leaf} == {0: 1, 1: 2, 2: 3, 4: 2}


def test_random_is_uniform_with_replacement_over_root_and_inner_nodes():
    t = _tree()
    # exactly the official rule: rng.choice over root + non-leaf nodes, n times
    ref = random.Random(3)
    assert RandomPolicy().choose(t, 5, random.Random(3)) == [ref.choice(t.expandable()) for _ in range(5)]
    draws = Counter(RandomPolicy().choose(t, 20_000, random.Random(0)))
    assert set(draws) == set(t.expandable())  # never a leaf
    for c in t.expandable():
        assert draws[c] / 20_000 == pytest.approx(1 / 5, abs=0.015)
    assert len(set(RandomPolicy().choose(t, 50, random.Random(1)))) > 1  # with replacement, not one node


def test_entropy_picks_the_planted_high_surprisal_node_first():
    t = _tree()
    assert EntropyPolicy("max").choose(t, 1, random.Random(0)) == [1]
    assert EntropyPolicy("mean").choose(t, 1, random.Random(0)) == [4]
    # ranking by max −log p: 1 (5.0), 4 (2.5), 2 (0.3), 0 (0.2), then the root; wraps around past the end
    assert EntropyPolicy("max").choose(t, 7, random.Random(0)) == [1, 4, 2, 0, ROOT, 1, 4]
    # the same for every rng when there are no ties
    assert all(EntropyPolicy().choose(t, 3, random.Random(s)) == [1, 4, 2] for s in range(20))


def test_entropy_breaks_ties_at_random_and_falls_back_to_the_root():
    t = Tree("p", 0, [1])
    t.attach(ROOT, [_step([-1.0]), _step([-1.0]), _step([-1.0], leaf=True)], 0)
    firsts = {EntropyPolicy().choose(t, 1, random.Random(s))[0] for s in range(40)}
    assert firsts == {0, 1}
    only_leaf = Tree("q", 0, [1])
    only_leaf.attach(ROOT, [_step([-3.0], leaf=True)], 0)
    assert EntropyPolicy().choose(only_leaf, 2, random.Random(0)) == [ROOT, ROOT]


def test_depth_stratified_draws_a_depth_uniformly_then_a_node():
    t = _tree()  # depths present: 0 (root), 1 (node 0), 2 (nodes 1, 4), 3 (node 2)
    n = 40_000
    draws = Counter(DepthStratifiedPolicy().choose(t, n, random.Random(0)))
    expected = {ROOT: 1 / 4, 0: 1 / 4, 1: 1 / 8, 4: 1 / 8, 2: 1 / 4}
    assert set(draws) == set(expected)
    for c, p in expected.items():
        assert draws[c] / n == pytest.approx(p, abs=0.012)


def test_make_policy_names():
    assert isinstance(make_policy("random"), RandomPolicy)
    assert isinstance(make_policy("depth"), DepthStratifiedPolicy)
    assert make_policy("entropy", "mean").statistic == "mean"
    with pytest.raises(ValueError, match="unknown expansion policy 'bfs'"):
        make_policy("bfs")
    with pytest.raises(ValueError, match="'median'"):
        EntropyPolicy("median")


def test_entropy_policy_in_real_sampling_branches_from_the_most_uncertain_steps(policy, tokenizer, retriever,
                                                                               questions):
    backend = HFBackend(policy, tokenizer.pad_token_id, tokenizer.eos_token_id)
    prompts = [(q["prompt_id"], prompt_ids(tokenizer, q["prompt"])) for q in questions["train"][:6]]
    sampling = SamplingConfig(trees_per_prompt=2, expansions_per_round=1, expansion_rounds=1,
                              expansion_policy="entropy")
    agent = AgentConfig(max_turns=4, max_tokens_per_turn=12, max_total_tokens=200)
    trees = sample_trees(backend, SearchEnv(retriever, tokenizer), prompts, sampling, agent, seed=0)
    scorer = EntropyPolicy("max")
    checked = 0
    for t in trees:
        round0_inner = [n.node_id for n in t.nodes if n.expansion_round == 0 and not n.is_leaf]
        starts = [n for n in t.nodes if n.expansion_round == 1
                  and (n.parent_id is None or t.nodes[n.parent_id].expansion_round == 0)]
        assert len(starts) == 1
        parent = ROOT if starts[0].parent_id is None else starts[0].parent_id
        if not round0_inner:
            assert parent == ROOT
            continue
        best = max(scorer.uncertainty(t, c) for c in round0_inner)
        assert parent != ROOT and scorer.uncertainty(t, parent) == best
        checked += 1
    assert checked > 0
