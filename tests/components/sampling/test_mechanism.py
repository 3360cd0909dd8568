"""components.sampling.mechanism on hand-made nodes rows: tool calls per trajectory, first-step answers, and
truncated or pool-cut trajectories by depth and by expansion round."""

from __future__ import annotations

import pytest

from arborl.components.sampling.mechanism import mechanism_metrics


def row(tid, nid, parent, depth, action, finish=None, observed=True, rnd=0):
    mask = [True, True] + ([False] if action == "search" and observed else [])
    return {"prompt_id": "p", "tree_id": tid, "node_id": nid, "parent_id": parent, "depth": depth,
            "expansion_round": rnd, "action": action, "loss_mask": mask, "is_leaf": finish is not None,
            "finish_reason": finish}


def test_mechanism_metrics_on_a_hand_made_tree():
    # tree 0: s0 (searched) → s1 (searched) → answer; a round-1 branch from s0 → cut by max_turns at depth 2;
    # tree 1: answers at once; tree 2: a search that the pool cut (no observation)
    rows = [row(0, 0, None, 1, "search"), row(0, 1, 0, 2, "search"), row(0, 2, 1, 3, "answer", "answer"),
            row(0, 3, 0, 2, "search", "max_turns", observed=False, rnd=1),
            row(1, 0, None, 1, "answer", "answer"),
            row(2, 0, None, 1, "search", "budget", observed=False)]
    m = mechanism_metrics(rows)
    assert m["tool_calls_per_trajectory"] == pytest.approx((2 + 1 + 0 + 0) / 4)
    assert m["first_step_answer_frac"] == pytest.approx(1 / 4)
    assert m["truncated_frac"] == pytest.approx(1 / 4) and m["pool_cut_frac"] == pytest.approx(1 / 4)
    assert m["truncated_depth2_frac"] == 1.0 and m["truncated_depth3_frac"] == 0.0
    assert m["pool_cut_depth1_frac"] == pytest.approx(1 / 2)  # of the two depth-1 leaves
    assert m["truncated_round1_frac"] == 1.0 and m["truncated_round0_frac"] == 0.0
    assert m["pool_cut_round0_frac"] == pytest.approx(1 / 3)
    assert mechanism_metrics([])["tool_calls_per_trajectory"] == 0.0
