"""components.advantages.preferences: V(n), sibling preference pairs and the granularity report."""

from __future__ import annotations

import random
from collections import defaultdict
from itertools import combinations

import pytest

from arborl.components.advantages.preferences import build_forest, granularity, node_advantage, preference_pairs
from arborl.components.artifacts import schemas


def node(pid, tid, nid, parent, depth, leaf):
    return {"prompt_id": pid, "tree_id": tid, "node_id": nid, "parent_id": parent, "depth": depth,
            "expansion_round": 0, "token_ids": [1], "loss_mask": [True], "logprobs": [-1.0],
            "text": f"{pid}{tid}{nid}", "action": "answer" if leaf else "search", "is_leaf": leaf,
            "finish_reason": "answer" if leaf else None, "policy_version": 0}


def reward(pid, tid, leaf, r):
    return {"prompt_id": pid, "tree_id": tid, "leaf_id": leaf, "reward": r, "correct": r == 1.0, "f1": r,
            "verifier": "test", "details": "{}", "error": None}


# Prompt p, two trees.                        Prompt q: two one-node-deep trees, tied.
#   tree 0: 0 ─┬─ 1 (R 1.0)                      tree 0: 0 ── 1 (R 1.0)
#              ├─ 2 ─┬─ 3 (R 0.0)                tree 1: 0 (R 1.0)
#              │     └─ 5 (R 0.2)
#              └─ 4 (R 1.0)
#           6 (R 0.0)   (a fresh chain from the prompt)
#   tree 1: 0 ── 1 (R 0.2)
NODES = [
    node("p", 0, 0, None, 1, False), node("p", 0, 1, 0, 2, True), node("p", 0, 2, 0, 2, False),
    node("p", 0, 3, 2, 3, True), node("p", 0, 4, 0, 2, True), node("p", 0, 5, 2, 3, True),
    node("p", 0, 6, None, 1, True),
    node("p", 1, 0, None, 1, False), node("p", 1, 1, 0, 2, True),
    node("q", 0, 0, None, 1, False), node("q", 0, 1, 0, 2, True), node("q", 1, 0, None, 1, True),
]
REWARDS = [
    reward("p", 0, 1, 1.0), reward("p", 0, 3, 0.0), reward("p", 0, 4, 1.0), reward("p", 0, 5, 0.25),
    reward("p", 0, 6, 0.0), reward("p", 1, 1, 0.25), reward("q", 0, 1, 1.0), reward("q", 1, 0, 1.0),
]
PROMPTS = {"p": "<question> p </question>", "q": "<question> q </question>"}
Q = PROMPTS["p"]


def test_values_are_mean_leaf_rewards():
    v = build_forest(NODES, REWARDS).values
    assert v[("p", 0, 2)] == pytest.approx(0.125)
    assert v[("p", 0, 0)] == pytest.approx((1.0 + 0.0 + 1.0 + 0.25) / 4)  # leaves, not children, are averaged
    assert v[("p", 1, 0)] == pytest.approx(0.25)
    assert v[("p", 0, 6)] == 0.0 and v[("q", 0, 0)] == 1.0


def test_pairs_on_hand_made_tree():
    got = preference_pairs(build_forest(NODES, REWARDS), PROMPTS, margin=0.1)
    simple = [(r["depth"], r["prompt"], r["chosen"], r["rejected"], round(r["value_gap"], 6)) for r in got]
    assert simple == [
        # depth 1: the first steps of both trees and the fresh chain are siblings under the prompt
        (1, Q, "p00 p01", "p06", 0.5625),  # chosen follows its best child (1 and 4 tie at 1.0: lower id)
        (1, Q, "p00 p01", "p10 p11", 0.3125),
        (1, Q, "p10 p11", "p06", 0.25),
        # depth 2: children of p/0/0 — 1 vs 4 tie and give no pair; rejected follows the worst child (3)
        (2, f"{Q} p00", "p01", "p02 p03", 0.875),
        (2, f"{Q} p00", "p04", "p02 p03", 0.875),
        (3, f"{Q} p00 p02", "p05", "p03", 0.25),
    ]  # prompt q's two first steps tie: no pair
    first = got[0]
    assert first["branch_tree_id"] is None and first["branch_node_id"] is None
    assert (first["chosen_tree_id"], first["chosen_node_id"], first["rejected_tree_id"], first["rejected_node_id"]) \
        == (0, 0, 0, 6)
    assert (got[3]["branch_tree_id"], got[3]["branch_node_id"]) == (0, 0)
    assert all(r["chosen_value"] - r["rejected_value"] == pytest.approx(r["value_gap"]) for r in got)


def test_margin_drops_small_gaps():
    got = preference_pairs(build_forest(NODES, REWARDS), PROMPTS, margin=0.3)
    assert [round(r["value_gap"], 4) for r in got] == [0.5625, 0.3125, 0.875, 0.875]


def test_pairs_fit_the_dpo_schema(tmp_path):
    rows = preference_pairs(build_forest(NODES, REWARDS), PROMPTS, margin=0.1)
    uri = str(tmp_path / "preferences.parquet")
    assert schemas.write(rows, schemas.PREFERENCES, uri) == 6
    table = schemas.read(uri, schemas.PREFERENCES)
    assert table.column_names[:3] == ["prompt", "chosen", "rejected"]
    assert table.column("depth").to_pylist() == [1, 1, 1, 2, 2, 3]


def test_granularity_on_hand_made_tree():
    forest = build_forest(NODES, REWARDS)
    adv = {k: 0.5 if k[0] == "p" else -1.0 for k in forest.nodes}
    got = {r["depth"]: r for r in granularity(forest, 0.1, adv)}
    assert sorted(got) == [1, 2, 3]
    d1, d2, d3 = got[1], got[2], got[3]
    assert (d1["nodes"], d1["branch_points"], d1["informative_sets"], d1["sibling_pairs"],
            d1["informative_pairs"], d1["preference_pairs"]) == (5, 2, 1, 4, 3, 3)
    assert d1["mean_abs_dv"] == pytest.approx((0.5625 + 0.3125 + 0.25) / 3)
    assert d1["mean_abs_advantage"] == pytest.approx((3 * 0.5 + 2 * 1.0) / 5)
    assert (d2["nodes"], d2["branch_points"], d2["informative_sets"], d2["sibling_pairs"],
            d2["informative_pairs"], d2["preference_pairs"]) == (5, 1, 1, 3, 2, 2)
    assert d2["mean_abs_dv"] == pytest.approx(0.875)
    assert (d3["nodes"], d3["branch_points"], d3["informative_pairs"], d3["preference_pairs"]) == (2, 1, 1, 1)
    assert d3["mean_abs_dv"] == pytest.approx(0.25)
    assert granularity(forest, 0.1)[0]["mean_abs_advantage"] is None
    assert [r["preference_pairs"] for r in granularity(forest, 0.3)] == [2, 2, 0]


def test_node_advantage():
    assert node_advantage(1.5, -0.5, 4) == pytest.approx(0.25)
    assert node_advantage(0.0, 0.0, 0) == 0.0


@pytest.mark.parametrize(("nodes", "rewards", "message"), [
    (NODES, REWARDS[1:], r"leaf \('p', 0, 1\) has no reward"),
    (NODES, [*REWARDS, reward("p", 0, 2, 1.0)], r"\('p', 0, 2\) is not a leaf"),
    ([*NODES, node("p", 0, 9, 8, 2, True)], REWARDS, r"\('p', 0, 9\) has parent_id 8"),
    ([*NODES, node("p", 0, 9, 0, 2, False)], REWARDS, r"non-leaf node \('p', 0, 9\) has no leaf"),
])
def test_bad_input_names_the_node(nodes, rewards, message):
    with pytest.raises(ValueError, match=message):
        build_forest(nodes, rewards)


def test_missing_prompt_text_is_named():
    with pytest.raises(KeyError, match="'q'"):
        preference_pairs(build_forest(NODES, REWARDS), {"p": "x"}, 0.1)


def random_trees(rng: random.Random) -> tuple[list[dict], list[dict]]:
    """Random forests: a few prompts × trees, nodes attached under random earlier nodes or the prompt."""
    nodes, rewards = [], []
    for p in range(3):
        for t in range(rng.randint(1, 3)):
            depth, parent_of = {}, {}
            for i in range(rng.randint(1, 12)):
                parent = rng.choice([None, *range(i)])
                parent_of[i], depth[i] = parent, 1 if parent is None else depth[parent] + 1
            for i in depth:
                leaf = i not in parent_of.values()
                nodes.append(node(f"p{p}", t, i, parent_of[i], depth[i], leaf))
                if leaf:
                    rewards.append(reward(f"p{p}", t, i, rng.choice([0.0, 0.1, 0.2, 0.8, 1.0])))
    return nodes, rewards


@pytest.mark.parametrize("seed", range(6))
def test_matches_trajectory_enumeration(seed):
    """Reference: enumerate root→leaf trajectories; V(n) = mean reward of the trajectories through n;
    siblings = distinct nodes that follow the same prefix (the prompt, or the same node)."""
    nodes, rewards = random_trees(random.Random(seed))
    by_key = {(n["prompt_id"], n["tree_id"], n["node_id"]): n for n in nodes}
    trajectories = []
    for r in rewards:
        path, cur = [], (r["prompt_id"], r["tree_id"], r["leaf_id"])
        while True:
            path.insert(0, cur)
            if by_key[cur]["parent_id"] is None:
                break
            cur = (cur[0], cur[1], by_key[cur]["parent_id"])
        trajectories.append((path, r["reward"]))
    through = defaultdict(list)
    for path, r in trajectories:
        for k in path:
            through[k].append(r)
    ref_v = {k: sum(v) / len(v) for k, v in through.items()}
    siblings = defaultdict(set)
    for path, _ in trajectories:
        for i, k in enumerate(path):
            siblings[path[i - 1] if i else k[0]].add(k)
    margin = 0.15
    ref_pairs = set()
    for group in siblings.values():
        for a, b in combinations(sorted(group), 2):
            if abs(ref_v[a] - ref_v[b]) >= margin:
                ref_pairs.add((a, b) if ref_v[a] > ref_v[b] else (b, a))

    forest = build_forest(nodes, rewards)
    assert forest.values == pytest.approx(ref_v)
    got = preference_pairs(forest, {f"p{p}": "q" for p in range(3)}, margin)
    pairs = {((r["prompt_id"], r["chosen_tree_id"], r["chosen_node_id"]),
              (r["prompt_id"], r["rejected_tree_id"], r["rejected_node_id"])) for r in got}
    assert pairs == ref_pairs and len(got) == len(ref_pairs)
    for r in got:
        chosen = (r["prompt_id"], r["chosen_tree_id"], r["chosen_node_id"])
        assert r["depth"] == by_key[chosen]["depth"]
        # chosen + prompt is one whole trajectory ending at a leaf whose path passes through the chosen node
        full = (r["prompt"] + " " + r["chosen"]).split(" ")[1:]
        assert any([by_key[k]["text"] for k in path] == full for path, _ in trajectories)
    report = granularity(forest, margin)
    assert sum(row["preference_pairs"] for row in report) == len(ref_pairs)
    assert sum(row["branch_points"] for row in report) == sum(len(g) >= 2 for g in siblings.values())
