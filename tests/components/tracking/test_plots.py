"""components.plots: folding granularity rows, and figures that render to PNG with the expected series."""

from __future__ import annotations

import io

import pytest

from arborl.components.tracking.plots import (
    aggregate_granularity,
    champion_figure,
    curves_figure,
    granularity_figure,
    stage_time_figure,
)


def g(depth, nodes, bp, inf_sets, inf_pairs, dv, adv, pref):
    return {"depth": depth, "nodes": nodes, "branch_points": bp, "informative_sets": inf_sets, "sibling_pairs": 0,
            "informative_pairs": inf_pairs, "mean_abs_dv": dv, "mean_abs_advantage": adv, "preference_pairs": pref}


ROWS = [g(1, 4, 2, 1, 1, 0.5, 1.0, 1), g(2, 2, 1, 1, 2, 0.25, 0.5, 2),  # iteration 1
        g(1, 6, 3, 2, 3, 0.1, 2.0, 2), g(2, 2, 1, 0, 0, 0.0, 0.0, 0)]   # iteration 2


def test_aggregate_granularity_weights_means():
    d1, d2 = aggregate_granularity(ROWS)
    assert (d1["depth"], d1["nodes"], d1["branch_points"], d1["informative_sets"], d1["preference_pairs"]) == \
        (1, 10, 5, 3, 3)
    assert d1["mean_abs_dv"] == pytest.approx((0.5 * 1 + 0.1 * 3) / 4)
    assert d1["mean_abs_advantage"] == pytest.approx((1.0 * 4 + 2.0 * 6) / 10)
    assert d2["mean_abs_dv"] == pytest.approx(0.25) and d2["mean_abs_advantage"] == pytest.approx(0.25)


def png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def test_curves_figure_plots_what_is_there():
    rows = [{"iteration": 0, "test_em": 0.1, "test_em_sampled": 0.2, "test_tool_calls": 0.5},
            {"iteration": 1, "reward_mean": 0.3, "correct_mean": 0.2, "tool_calls_per_prompt": 6.0,
             "trajectories_per_prompt": 3.0, "chain_equivalents_per_prompt": 2.0,
             "trajectories_per_chain_equivalent": 1.5},
            {"iteration": 2, "reward_mean": 0.5, "correct_mean": 0.4, "tool_calls_per_prompt": 3.0,
             "trajectories_per_prompt": 3.0, "test_em": 0.4, "test_em_sampled": 0.3, "test_tool_calls": 1.0}]
    fig = curves_figure(rows)
    reward, em, tools, budget = fig.axes
    assert [list(line.get_xdata()) for line in reward.lines] == [[1, 2], [1, 2]]
    assert list(em.lines[0].get_xdata()) == [0, 2] and list(em.lines[0].get_ydata()) == [0.1, 0.4]
    assert list(tools.lines[0].get_ydata()) == [2.0, 1.0]  # tool calls per trajectory
    assert [list(line.get_xdata()) for line in budget.lines] == [[1], [1]]
    assert png(fig).startswith(b"\x89PNG")


def test_granularity_figure():
    fig = granularity_figure(ROWS, title="iterations 1-2")
    counts, magnitude = fig.axes
    assert [p.get_height() for p in counts.patches] == [5, 2, 3, 1, 3, 2]  # bp, informative, pairs × depth
    assert list(magnitude.lines[1].get_ydata()) == pytest.approx([0.2, 0.25])
    assert png(fig).startswith(b"\x89PNG")


def test_stage_time_figure_stacks_stages():
    seconds = {0: {"prepare": 1.0, "warmstart": 30.0, "evaluate": 2.0},
               1: {"sample": 2.0, "verify": 0.5, "label": 0.5, "train": 3.0},
               2: {"sample": 2.5, "verify": 0.5, "label": 0.5, "train": 3.5, "evaluate": 1.0}}
    fig = stage_time_figure(seconds, "run t")
    warm, iters = fig.axes
    assert [p.get_height() for p in warm.patches] == [1.0, 30.0, 2.0] and warm.get_title() == "warm start: 33.0 s"
    assert iters.get_title() == "RL iterations: 14.0 s"
    bars = {c.get_label(): [p.get_height() for p in c.patches] for c in iters.containers}
    assert bars == {"sample": [2.0, 2.5], "verify": [0.5, 0.5], "label": [0.5, 0.5], "train": [3.0, 3.5],
                    "evaluate": [0.0, 1.0]}
    tops = [p.get_y() + p.get_height() for p in iters.containers[-1].patches]  # stacked: evaluate on top
    assert tops == [6.0, 8.0]
    assert [t.get_text() for t in iters.get_legend().get_texts()] == ["prepare", "warmstart", "sample", "verify",
                                                                       "label", "train", "evaluate"]
    assert png(fig).startswith(b"\x89PNG")


def test_champion_figure_follows_promotions():
    rows = [{"version": "1", "decision": "promote", "metric": "em", "challenger": 0.4, "baseline": 0.1},
            {"version": "2", "decision": "reject", "metric": "em", "challenger": 0.3, "baseline": 0.41},
            {"version": "3", "decision": None, "metric": None, "challenger": None, "baseline": None},
            {"version": "4", "decision": "promote", "metric": "em", "challenger": 0.8, "baseline": 0.4}]
    fig = champion_figure(rows)
    [ax] = fig.axes
    [champion] = ax.lines
    assert list(champion.get_xdata()) == [1, 2, 4] and list(champion.get_ydata()) == [0.4, 0.41, 0.8]
    promoted, rejected = ax.collections
    assert promoted.get_offsets().tolist() == [[1, 0.4], [4, 0.8]] and rejected.get_offsets().tolist() == [[2, 0.3]]
    assert "em" in ax.get_ylabel() and png(fig).startswith(b"\x89PNG")
