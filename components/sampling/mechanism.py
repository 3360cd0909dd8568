"""What an iteration's sampled trajectories did, from the nodes rows: the mechanism metrics that say whether a
policy keeps searching and where trajectories end early.

Per trajectory (root → leaf path): its tool calls (search steps that got an observation), whether it answered at
its first step, and how it ended: `truncated` by a path cap (agent.max_turns, max_total_tokens, a turn's token cap:
finish reasons `max_turns` and `length`), or `pool_cut` (finish reason `budget`: an exact token pool ran out, only
under the opt-in `budget.token_stop: exact`). Truncation is broken down by the leaf's depth and by generation order
(its expansion round: 0 for the first chains, r for the r-th round of expansions).
"""

from __future__ import annotations

from collections import defaultdict

from arborl.components.sampling.forest import Forest

TRUNCATED = ("max_turns", "length")
POOL_CUT = "budget"


def _tool_call(row: dict) -> bool:
    """A search step that got its observation (observation tokens carry loss_mask false)."""
    return row["action"] == "search" and not all(row["loss_mask"])


def mechanism_metrics(rows: list[dict]) -> dict[str, float]:
    """Metrics of one batch of nodes rows (the NODES contract): `tool_calls_per_trajectory`,
    `first_step_answer_frac`, `truncated_frac`, `pool_cut_frac`, and `truncated_depth<d>_frac` /
    `pool_cut_depth<d>_frac` (over the leaves at depth d), `truncated_round<r>_frac` / `pool_cut_round<r>_frac`
    (over the leaves of expansion round r). Fractions are of trajectories; empty batches give zeros."""
    forest = Forest.from_rows(rows)
    leaves = forest.leaves()
    calls = first_answers = truncated = cut = 0
    by_depth: dict[int, list[int]] = defaultdict(lambda: [0, 0, 0])  # leaves, truncated, pool-cut
    by_round: dict[int, list[int]] = defaultdict(lambda: [0, 0, 0])
    for key in leaves:
        path = forest.path(key)
        calls += sum(_tool_call(forest.nodes[k]) for k in path)
        first_answers += forest.nodes[path[0]]["action"] == "answer"
        leaf = forest.nodes[key]
        is_truncated, is_cut = leaf["finish_reason"] in TRUNCATED, leaf["finish_reason"] == POOL_CUT
        truncated += is_truncated
        cut += is_cut
        for table, key in ((by_depth, leaf["depth"]), (by_round, leaf["expansion_round"])):
            counts = table[key]
            counts[0] += 1
            counts[1] += is_truncated
            counts[2] += is_cut
    n = max(len(leaves), 1)
    out = {"tool_calls_per_trajectory": calls / n, "first_step_answer_frac": first_answers / n,
           "truncated_frac": truncated / n, "pool_cut_frac": cut / n}
    for name, table in (("depth", by_depth), ("round", by_round)):
        for key, (total, trunc, pool) in sorted(table.items()):
            out[f"truncated_{name}{key}_frac"] = trunc / total
            out[f"pool_cut_{name}{key}_frac"] = pool / total
    return out
