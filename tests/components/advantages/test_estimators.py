"""components.advantages.estimators (and the per-leaf estimators registered on it): group normalisation, per-leaf
advantages and per-node token weights."""

from __future__ import annotations

import math
import random
import statistics

import numpy as np
import pytest

from arborl.components.advantages.estimators import group_norm, node_weights
from arborl.components.advantages.registry import estimator_names, get_estimator, leaf_advantages

EPS = 1e-6


@pytest.mark.parametrize("seed", range(5))
def test_group_norm_matches_numpy(seed):
    rng = np.random.default_rng(seed)
    r = rng.normal(size=rng.integers(2, 12))
    expected = (r - r.mean()) / (r.std(ddof=1) + EPS)
    np.testing.assert_allclose(group_norm(r, EPS), expected, rtol=1e-12)
    np.testing.assert_allclose(group_norm(r, EPS, scale=False), r - r.mean(), rtol=1e-12)
    # against the statistics module's unbiased stdev as well
    ref = [(x - statistics.mean(r)) / (statistics.stdev(r) + EPS) for x in r]
    np.testing.assert_allclose(group_norm(list(r), EPS), ref, rtol=1e-9)


def test_group_norm_known_values():
    np.testing.assert_allclose(group_norm([1.0, 0.0]), [0.5 / (math.sqrt(0.5) + EPS), -0.5 / (math.sqrt(0.5) + EPS)])
    np.testing.assert_allclose(group_norm([1.0, 0.0, 1.0, 1.0], eps=0.0), [0.5, -1.5, 0.5, 0.5])


@pytest.mark.parametrize("rewards", [[0.7], [0.2, 0.2, 0.2], [1.0, 1.0], [0.0]])
@pytest.mark.parametrize("scale", [True, False])
def test_group_norm_degenerate_groups_give_zero(rewards, scale):
    out = group_norm(rewards, EPS, scale)
    assert out.shape == (len(rewards),)
    assert np.all(out == 0.0)


def test_group_norm_empty_group():
    assert group_norm([]).shape == (0,)


# Hand-made set: two prompts × two trees. Keys are (prompt_id, tree_id, leaf node_id).
#   a/0: leaves 1 → 1.0, 2 → 0.0      a/1: leaves 1 → 1.0, 3 → 1.0 (zero spread)
#   b/0: leaf 4 → 0.0                 b/1: leaf 2 → 1.0 (size-1 trees)
REWARDS = {
    ("a", 0, 1): 1.0, ("a", 0, 2): 0.0, ("a", 1, 1): 1.0, ("a", 1, 3): 1.0,
    ("b", 0, 4): 0.0, ("b", 1, 2): 1.0,
}
# prompt a: mean 0.75, unbiased std sqrt((3·0.0625 + 0.5625) / 3) = 0.5
INTER_A = {1.0: 0.25 / (0.5 + EPS), 0.0: -0.75 / (0.5 + EPS)}
# prompt b: mean 0.5, std sqrt(0.5)
INTER_B = {1.0: 0.5 / (math.sqrt(0.5) + EPS), 0.0: -0.5 / (math.sqrt(0.5) + EPS)}
# tree a/0: mean 0.5, std sqrt(0.5); the other trees give 0
INTRA_A0 = {1.0: 0.5 / (math.sqrt(0.5) + EPS), 0.0: -0.5 / (math.sqrt(0.5) + EPS)}

EXPECTED = {
    "tree_inter": {
        ("a", 0, 1): INTER_A[1.0], ("a", 0, 2): INTER_A[0.0], ("a", 1, 1): INTER_A[1.0], ("a", 1, 3): INTER_A[1.0],
        ("b", 0, 4): INTER_B[0.0], ("b", 1, 2): INTER_B[1.0],
    },
    "tree_intra": {
        ("a", 0, 1): INTRA_A0[1.0], ("a", 0, 2): INTRA_A0[0.0], ("a", 1, 1): 0.0, ("a", 1, 3): 0.0,
        ("b", 0, 4): 0.0, ("b", 1, 2): 0.0,
    },
    "dr_grpo": {
        ("a", 0, 1): 0.25, ("a", 0, 2): -0.75, ("a", 1, 1): 0.25, ("a", 1, 3): 0.25,
        ("b", 0, 4): -0.5, ("b", 1, 2): 0.5,
    },
}
EXPECTED["grpo"] = EXPECTED["tree_inter"]
EXPECTED["tree"] = {k: EXPECTED["tree_intra"][k] + EXPECTED["tree_inter"][k] for k in REWARDS}


@pytest.mark.parametrize("estimator", sorted(EXPECTED))
def test_leaf_advantages_by_hand(estimator):
    got = leaf_advantages(REWARDS, estimator, EPS)
    assert set(got) == set(REWARDS)
    for key, value in EXPECTED[estimator].items():
        assert got[key] == pytest.approx(value, abs=1e-12), key


def test_tree_literal_values():
    got = leaf_advantages(REWARDS, "tree", EPS)
    assert got[("a", 0, 1)] == pytest.approx(math.sqrt(0.5) + 0.5, rel=1e-5)
    assert got[("a", 0, 2)] == pytest.approx(-math.sqrt(0.5) - 1.5, rel=1e-5)
    assert got[("a", 1, 3)] == pytest.approx(0.5, rel=1e-5)


def test_all_estimators_are_covered():
    assert {n for n in estimator_names() if not get_estimator(n).per_node} == set(EXPECTED)


def _random_rewards(seed: int) -> dict:
    rng = random.Random(seed)
    rewards = {}
    for p in range(4):
        for t in range(rng.randint(1, 3)):
            for leaf in range(rng.randint(1, 5)):
                rewards[(f"p{p}", t, leaf)] = rng.choice([0.0, 0.1, 0.2, 0.8, 1.0])
    return rewards


@pytest.mark.parametrize("seed", range(5))
def test_tree_is_intra_plus_inter(seed):
    rewards = _random_rewards(seed)
    tree = leaf_advantages(rewards, "tree")
    intra = leaf_advantages(rewards, "tree_intra")
    inter = leaf_advantages(rewards, "tree_inter")
    for k in rewards:
        assert tree[k] == pytest.approx(intra[k] + inter[k], abs=1e-12)
    # inter is grpo over all leaves of the prompt, against an independent reference
    for k in rewards:
        group = [v for kk, v in rewards.items() if kk[0] == k[0]]
        ref = 0.0 if len(set(group)) < 2 else (rewards[k] - statistics.mean(group)) / (statistics.stdev(group) + 1e-6)
        assert inter[k] == pytest.approx(ref, abs=1e-9)


def test_unknown_estimator_is_a_value_error():
    with pytest.raises(ValueError, match="'ppo'"):
        leaf_advantages(REWARDS, "ppo")


# node_weights on a hand-made tree (prompt "a"):
#   tree 0: 0 (first step) → 1 (leaf), 0 → 2 (leaf)
#   tree 1: 0 → 1 (leaf), 0 → 2 → 3 (leaf)
PARENTS = {
    ("a", 0, 0): None, ("a", 0, 1): 0, ("a", 0, 2): 0,
    ("a", 1, 0): None, ("a", 1, 1): 0, ("a", 1, 2): 0, ("a", 1, 3): 2,
}


def test_node_weights_by_hand():
    adv = {("a", 0, 1): 1.5, ("a", 0, 2): -2.0, ("a", 1, 1): 0.5, ("a", 1, 3): 0.25}
    w = node_weights(PARENTS, adv)
    assert w[("a", 0, 0)] == pytest.approx((1.5, -2.0, 2))  # shared prefix: A⁺ and A⁻ separately
    assert w[("a", 0, 1)] == pytest.approx((1.5, 0.0, 1))
    assert w[("a", 0, 2)] == pytest.approx((0.0, -2.0, 1))
    assert w[("a", 1, 0)] == pytest.approx((0.75, 0.0, 2))
    assert w[("a", 1, 1)] == pytest.approx((0.5, 0.0, 1))
    assert w[("a", 1, 2)] == pytest.approx((0.25, 0.0, 1))
    assert w[("a", 1, 3)] == pytest.approx((0.25, 0.0, 1))


def test_node_weights_count_zero_advantage_leaves_in_multiplicity():
    adv = {("a", 0, 1): 0.0, ("a", 0, 2): -1.0, ("a", 1, 1): 0.0, ("a", 1, 3): 0.0}
    w = node_weights(PARENTS, adv)
    assert w[("a", 0, 0)] == (0.0, -1.0, 2)
    assert w[("a", 1, 0)] == (0.0, 0.0, 2)
    assert w[("a", 1, 2)] == (0.0, 0.0, 1)


def test_node_weights_equal_duplicated_trajectories_on_random_trees():
    """A node's (A⁺, A⁻, k) equals summing over the duplicated root→leaf paths through it."""
    rng = random.Random(3)
    parents, leaves = {}, []
    for t in range(3):
        n_nodes = rng.randint(1, 12)
        for i in range(n_nodes):
            parents[("p", t, i)] = None if i == 0 or rng.random() < 0.2 else rng.randrange(i)
        has_child = {parents[("p", t, i)] for i in range(n_nodes)}
        leaves += [("p", t, i) for i in range(n_nodes) if i not in has_child]
    adv = {leaf: rng.choice([-1.0, -0.5, 0.0, 0.5, 2.0]) for leaf in leaves}
    w = node_weights(parents, adv)
    for node in parents:
        through = []
        for leaf, a in adv.items():
            cur = leaf[2]
            path = []
            while cur is not None:
                path.append(cur)
                cur = parents[(leaf[0], leaf[1], cur)]
            if leaf[1] == node[1] and node[2] in path:
                through.append(a)
        assert w[node][0] == pytest.approx(sum(a for a in through if a > 0))
        assert w[node][1] == pytest.approx(sum(a for a in through if a < 0))
        assert w[node][2] == len(through)


def test_leaf_without_node_is_an_error():
    with pytest.raises(KeyError, match="no node"):
        node_weights(PARENTS, {("a", 0, 9): 1.0})


def test_process_advantages_by_hand():
    """TreeRL process advantage ((V(n)−V(root)) + (V(n)−V(parent)))/sqrt(L(n)) on a hand-made tree:
    n0 ─┬─ n1 (leaf, 1.0)        n4 (leaf, 0.5), a second first step
        └─ n2 ─ n3 (leaf, 0.0)   V(root) = mean(1, 0, 0.5) = 0.5, V(n0) = 0.5, V(n2) = 0"""
    from arborl.components.advantages.estimators import process_advantages

    parents = {("p", 0, 0): None, ("p", 0, 1): 0, ("p", 0, 2): 0, ("p", 0, 3): 2, ("p", 0, 4): None}
    rewards = {("p", 0, 1): 1.0, ("p", 0, 3): 0.0, ("p", 0, 4): 0.5}
    adv = process_advantages(parents, rewards)
    assert adv == pytest.approx({("p", 0, 0): 0.0, ("p", 0, 1): 1.0, ("p", 0, 2): -1.0, ("p", 0, 3): -0.5,
                                 ("p", 0, 4): 0.0})
    with pytest.raises(KeyError, match="no node"):
        process_advantages(parents, {("p", 0, 9): 1.0})
