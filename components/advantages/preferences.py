"""Step-level preference pairs and the granularity report, from sibling subtrees (docs/design.md, Step preferences).

All trees of one prompt hang under one common root, the prompt itself: the first steps of every tree
(each tree's initial chain and every fresh chain drawn from the root) are siblings of each other.
V(n) is the mean reward of the leaves under node n.

Depth. A sibling set is the children of one branch point (a node, or the prompt, with ≥ 2 children).
Its depth is the depth of the compared steps — the children's `depth` column — so depth 1 compares
first steps (the prompt is the branch point) and depth d compares steps after d − 1 shared steps.

Pairs. For every unordered pair of siblings (a, b) with V(a) − V(b) ≥ margin, one row in TRL's DPO
format, texts joined by single spaces as the verify stage joins a trajectory:

* `prompt`   — the prompt text, then the texts of the nodes from the first step down to the branch point
  (each node's text is its action followed by its observation);
* `chosen`   — a's text, then the texts along a's highest-value path to a leaf: at each node the child with
  the largest V (ties: the lowest (tree_id, node_id));
* `rejected` — b's text, then the texts along b's lowest-value path to a leaf (the child with the smallest V).

So `prompt + " " + chosen` and `prompt + " " + rejected` are both sampled trajectories.

Granularity report, one row per depth d:
* `nodes` — nodes at depth d; `mean_abs_advantage` — mean over them of |A⁺ + A⁻| / multiplicity, the
  magnitude of the mean advantage of the trajectories through the node (when advantages are given);
* `branch_points` — sibling sets at depth d; `informative_sets` — those whose values are not all equal;
* `sibling_pairs`, `informative_pairs` — unordered sibling pairs, and those with V(a) ≠ V(b);
* `mean_abs_dv` — mean |V(a) − V(b)| over the informative pairs (0 when there are none);
* `preference_pairs` — pairs with |V(a) − V(b)| ≥ margin, i.e. the rows `preference_pairs()` emits.
"""

from __future__ import annotations

from collections import defaultdict
from itertools import combinations

from arborl.components.sampling.forest import Forest, NodeKey

TIE = 1e-9  # value gaps below this are ties (V is a mean of float32 rewards)


def build_forest(nodes: list[dict], rewards: list[dict]) -> Forest:
    """The forest of node rows (NODES schema) with V(n) from the leaves' reward rows (REWARDS schema).

    Raises ValueError naming the node when a leaf has no reward, a reward has no leaf, a parent is missing,
    or a non-leaf node has no leaf below it.
    """
    return Forest.from_rows(nodes).with_rewards(rewards)


def _text(forest: Forest, keys: list[NodeKey]) -> str:
    return " ".join(forest.nodes[k]["text"] for k in keys)


def preference_pairs(forest: Forest, prompts: dict[str, str], margin: float) -> list[dict]:
    """Rows of the `preferences` table (see the module docstring); `prompts` maps prompt_id → prompt text."""
    rows = []
    for pid, branch, siblings in forest.sibling_sets():
        if pid not in prompts:
            raise KeyError(f"prompt_id {pid!r} has nodes but no prompt text")
        prefix = " ".join([prompts[pid], *([_text(forest, forest.path(branch))] if branch else [])])
        for a, b in combinations(siblings, 2):
            gap = forest.values[a] - forest.values[b]
            if abs(gap) <= TIE or abs(gap) < margin - TIE:
                continue
            hi, lo = (a, b) if gap > 0 else (b, a)
            rows.append({
                "prompt": prefix,
                "chosen": _text(forest, forest.extreme_path(hi, best=True)),
                "rejected": _text(forest, forest.extreme_path(lo, best=False)),
                "prompt_id": pid,
                "depth": forest.nodes[hi]["depth"],
                "value_gap": abs(gap),
                "chosen_value": forest.values[hi],
                "rejected_value": forest.values[lo],
                "branch_tree_id": None if branch is None else branch[1],
                "branch_node_id": None if branch is None else branch[2],
                "chosen_tree_id": hi[1],
                "chosen_node_id": hi[2],
                "rejected_tree_id": lo[1],
                "rejected_node_id": lo[2],
            })
    return rows


def node_advantage(adv_pos: float, adv_neg: float, multiplicity: int) -> float:
    """Mean advantage of the trajectories through a node: (A⁺ + A⁻) / multiplicity (0 with no trajectory)."""
    return (adv_pos + adv_neg) / multiplicity if multiplicity else 0.0


def granularity(forest: Forest, margin: float, advantages: dict[NodeKey, float] | None = None) -> list[dict]:
    """One row per depth (see the module docstring), sorted by depth; `advantages` maps node → node_advantage."""
    by_depth: dict[int, dict] = defaultdict(lambda: {
        "nodes": 0, "abs_adv_sum": 0.0, "branch_points": 0, "informative_sets": 0, "sibling_pairs": 0,
        "informative_pairs": 0, "abs_dv_sum": 0.0, "preference_pairs": 0,
    })
    for key, node in forest.nodes.items():
        row = by_depth[node["depth"]]
        row["nodes"] += 1
        if advantages is not None:
            row["abs_adv_sum"] += abs(advantages[key])
    for _, _, siblings in forest.sibling_sets():
        row = by_depth[forest.nodes[siblings[0]]["depth"]]
        row["branch_points"] += 1
        vals = [forest.values[s] for s in siblings]
        row["informative_sets"] += int(max(vals) - min(vals) > TIE)
        for va, vb in combinations(vals, 2):
            row["sibling_pairs"] += 1
            if abs(va - vb) > TIE:
                row["informative_pairs"] += 1
                row["abs_dv_sum"] += abs(va - vb)
                row["preference_pairs"] += int(abs(va - vb) >= margin - TIE)
    out = []
    for depth in sorted(by_depth):
        r = by_depth[depth]
        out.append({
            "depth": depth,
            "nodes": r["nodes"],
            "branch_points": r["branch_points"],
            "informative_sets": r["informative_sets"],
            "sibling_pairs": r["sibling_pairs"],
            "informative_pairs": r["informative_pairs"],
            "mean_abs_dv": r["abs_dv_sum"] / r["informative_pairs"] if r["informative_pairs"] else 0.0,
            "preference_pairs": r["preference_pairs"],
            "mean_abs_advantage": r["abs_adv_sum"] / r["nodes"] if advantages is not None else None,
        })
    return out
