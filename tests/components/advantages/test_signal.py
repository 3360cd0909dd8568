"""components.advantages.signal on hand-made groups and trees: zero-spread groups, informative sibling sets by
depth, trainable tokens with non-zero advantage, and pooling over iterations."""

from __future__ import annotations

import pytest

from arborl.components.advantages.preferences import build_forest
from arborl.components.advantages.registry import label_advantages
from arborl.components.advantages.signal import (
    informative_sibling_sets,
    nonzero_advantage_tokens,
    pool,
    signal_metrics,
    zero_spread_groups,
)


def node(pid, tid, nid, parent, depth, leaf, tokens=1):
    return {"prompt_id": pid, "tree_id": tid, "node_id": nid, "parent_id": parent, "depth": depth,
            "expansion_round": 0, "token_ids": [1] * (tokens + 1), "loss_mask": [True] * tokens + [False],
            "logprobs": [-1.0] * tokens + [float("nan")], "text": f"{pid}{tid}{nid}",
            "action": "answer" if leaf else "search", "is_leaf": leaf, "finish_reason": "answer" if leaf else None,
            "policy_version": 0}


# Trees. Prompt p:                               Prompt q: two trees, every reward 1.
#   tree 0: 0 ─┬─ 1 (R 1.0)                        tree 0: 0 ── 1
#              ├─ 2 ─┬─ 3 (R 0.0)                  tree 1: 0
#              │     └─ 5 (R 0.25)
#              └─ 4 (R 1.0)
#           6 (R 0.0)   (a fresh chain from the prompt)
#   tree 1: 0 ── 1 (R 0.25)
TREE_NODES = [
    node("p", 0, 0, None, 1, False), node("p", 0, 1, 0, 2, True), node("p", 0, 2, 0, 2, False),
    node("p", 0, 3, 2, 3, True), node("p", 0, 4, 0, 2, True), node("p", 0, 5, 2, 3, True),
    node("p", 0, 6, None, 1, True),
    node("p", 1, 0, None, 1, False), node("p", 1, 1, 0, 2, True),
    node("q", 0, 0, None, 1, False), node("q", 0, 1, 0, 2, True), node("q", 1, 0, None, 1, True),
]
TREE_REWARDS = {("p", 0, 1): 1.0, ("p", 0, 3): 0.0, ("p", 0, 4): 1.0, ("p", 0, 5): 0.25, ("p", 0, 6): 0.0,
                ("p", 1, 1): 0.25, ("q", 0, 1): 1.0, ("q", 1, 0): 1.0}

# GRPO groups: prompt a's four chains all right (no spread), prompt b's one right of four.
CHAIN_NODES = [node("a", t, 0, None, 1, True, tokens=n) for t, n in enumerate((3, 5, 2, 4))] + [
    node("b", t, 0, None, 1, True, tokens=n) for t, n in enumerate((1, 2, 3, 4))]
CHAIN_REWARDS = {("a", t, 0): 1.0 for t in range(4)} | {("b", t, 0): r for t, r in enumerate((0.0, 1.0, 0.0, 0.0))}


def _rows(rewards):
    return [{"prompt_id": k[0], "tree_id": k[1], "leaf_id": k[2], "reward": r} for k, r in rewards.items()]


def _parents(nodes):
    return {(n["prompt_id"], n["tree_id"], n["node_id"]): n["parent_id"] for n in nodes}


def _trainable(nodes):
    return {(n["prompt_id"], n["tree_id"], n["node_id"]): sum(n["loss_mask"]) for n in nodes}


def test_zero_spread_prompt_groups_of_chains():
    got = zero_spread_groups(CHAIN_REWARDS)
    assert (got["prompt_groups"], got["zero_spread_prompts"], got["zero_spread_prompt_frac"]) == (2, 1, 0.5)
    # every chain is a tree with one leaf: no spread within a tree, ever
    assert (got["tree_groups"], got["zero_spread_trees"], got["zero_spread_tree_frac"]) == (8, 8, 1.0)


def test_zero_spread_tree_and_prompt_groups_of_trees():
    got = zero_spread_groups(TREE_REWARDS)
    assert (got["prompt_groups"], got["zero_spread_prompts"]) == (2, 1)  # q's rewards are all 1
    # p/0 spreads; p/1 has one leaf; q/0 and q/1 one leaf each
    assert (got["tree_groups"], got["zero_spread_trees"], got["zero_spread_tree_frac"]) == (4, 3, 0.75)


def test_informative_sibling_sets_by_depth():
    got = informative_sibling_sets(build_forest(TREE_NODES, _rows(TREE_REWARDS)))
    # depth 1: p's first steps (V 0.5625, 0, 0.25) differ, q's (1, 1) do not; depth 2: p/0/0's children (1, 0.125,
    # 1); depth 3: p/0/2's children (0, 0.25). p/1/0 and q/0/0 have one child each: no sibling set.
    assert (got["branch_points"], got["informative_sets"]) == (4, 3)
    assert got["informative_set_frac"] == 0.75
    assert (got["depth1_informative_set_frac"], got["depth2_informative_set_frac"],
            got["depth3_informative_set_frac"]) == (0.5, 1.0, 1.0)


def test_informative_sets_of_chains_are_their_prompts():
    got = informative_sibling_sets(build_forest(CHAIN_NODES, _rows(CHAIN_REWARDS)))
    assert (got["branch_points"], got["informative_sets"], got["depth1_informative_set_frac"]) == (2, 1, 0.5)


def test_nonzero_advantage_tokens_of_chains():
    adv = label_advantages("grpo", _parents(CHAIN_NODES), CHAIN_REWARDS).leaf_advantages
    got = nonzero_advantage_tokens(_trainable(CHAIN_NODES), _parents(CHAIN_NODES), adv, per_node=False)
    assert got["trainable_tokens"] == 24 and got["nonzero_adv_tokens"] == 10  # only b's 1 + 2 + 3 + 4 tokens
    assert got["nonzero_adv_token_frac"] == pytest.approx(10 / 24)
    assert got["nonzero_adv_unique_token_frac"] == pytest.approx(10 / 24)  # chains share no tokens


def test_nonzero_advantage_tokens_of_trees_count_a_shared_node_once_per_trajectory():
    adv = label_advantages("tree", _parents(TREE_NODES), TREE_REWARDS).leaf_advantages
    assert all(adv[k] != 0 for k in adv if k[0] == "p") and all(adv[k] == 0 for k in adv if k[0] == "q")
    got = nonzero_advantage_tokens(_trainable(TREE_NODES), _parents(TREE_NODES), adv, per_node=False)
    # trajectories (one token a node): p/0: 2 + 3 + 2 + 3 + 1, p/1: 2 → 13 with signal; q: 2 + 1 without
    assert (got["trainable_tokens"], got["nonzero_adv_tokens"]) == (16, 13)
    assert got["nonzero_adv_token_frac"] == pytest.approx(13 / 16)
    assert got["nonzero_adv_unique_token_frac"] == pytest.approx(9 / 12)  # p's 9 nodes of 12, each once


def test_nonzero_advantage_tokens_per_node():
    keys = [("p", 0, 0), ("p", 0, 1), ("p", 0, 2)]
    trainable = dict(zip(keys, (2, 3, 5), strict=True))
    adv = {keys[0]: 0.0, keys[1]: 0.5, keys[2]: -1e-12}  # below 1e-9 counts as zero
    got = nonzero_advantage_tokens(trainable, {k: None for k in keys}, adv, per_node=True)
    assert (got["trainable_tokens"], got["nonzero_adv_tokens"], got["nonzero_adv_token_frac"]) == (10, 3, 0.3)


def test_signal_metrics_and_pool_over_iterations():
    parents = _parents(TREE_NODES)
    adv = label_advantages("tree", parents, TREE_REWARDS).leaf_advantages
    tree = signal_metrics(build_forest(TREE_NODES, _rows(TREE_REWARDS)), TREE_REWARDS, _trainable(TREE_NODES),
                          parents, adv, per_node=False)
    chain_parents = _parents(CHAIN_NODES)
    chain_adv = label_advantages("grpo", chain_parents, CHAIN_REWARDS).leaf_advantages
    chain = signal_metrics(build_forest(CHAIN_NODES, _rows(CHAIN_REWARDS)), CHAIN_REWARDS, _trainable(CHAIN_NODES),
                           chain_parents, chain_adv, per_node=False)
    assert tree["zero_spread_tree_frac"] == 0.75 and chain["nonzero_adv_token_frac"] == pytest.approx(10 / 24)
    # the label stage also reports the granularity counts per depth, which pool() reads
    per_depth = [{"depth1_branch_points": 2, "depth1_informative_sets": 1, "depth2_branch_points": 1,
                  "depth2_informative_sets": 1}, {"depth1_branch_points": 2, "depth1_informative_sets": 1}]
    pooled = pool([{**tree, **per_depth[0]}, {**chain, **per_depth[1]}])
    assert pooled["zero_spread_prompt_frac"] == pytest.approx((1 + 1) / (2 + 2))
    assert pooled["zero_spread_tree_frac"] == pytest.approx((3 + 8) / (4 + 8))
    assert pooled["informative_set_frac"] == pytest.approx((3 + 1) / (4 + 2))
    assert pooled["nonzero_adv_token_frac"] == pytest.approx((13 + 10) / (16 + 24))
    assert pooled["depth1_informative_set_frac"] == 0.5 and pooled["depth2_informative_set_frac"] == 1.0
    assert pool([])["nonzero_adv_token_frac"] == 0.0
