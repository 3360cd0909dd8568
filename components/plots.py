"""Dashboard figures of a run (matplotlib, no pyplot state, PNG through the Agg canvas).

* `curves_figure` — per-iteration curves: reward, exact match, tool calls, sampling budget.
* `granularity_figure` — by depth: branch points, informative sibling sets and preference pairs, and the
  mean |advantage| and mean |ΔV| (see components/advantages/preferences.py for the definitions).
"""

from __future__ import annotations

from collections import defaultdict

from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator


def _series(rows: list[dict], key: str, scale_by: str | None = None) -> tuple[list[int], list[float]]:
    pts = [(r["iteration"], r[key] / r[scale_by] if scale_by else r[key]) for r in rows
           if r.get(key) is not None and (scale_by is None or r.get(scale_by))]
    return [p[0] for p in pts], [p[1] for p in pts]


def curves_figure(rows: list[dict]) -> Figure:
    """Four panels over iterations. `rows` are per-iteration dicts with `iteration` and any of:
    reward_mean, correct_mean (verify); test_em, test_em_sampled, test_tool_calls (evaluate; iteration 0 is
    the warm start); tool_calls_per_prompt, trajectories_per_prompt, chain_equivalents_per_prompt,
    trajectories_per_chain_equivalent (sample). Missing keys are left out of their panel."""
    fig = Figure(figsize=(11, 7), layout="constrained")
    axes = fig.subplots(2, 2)
    panels = [
        (axes[0, 0], "training reward", [("reward_mean", None, "mean leaf reward"),
                                         ("correct_mean", None, "share of correct leaves")]),
        (axes[0, 1], "test exact match", [("test_em", None, "greedy"), ("test_em_sampled", None, "sampled, T=1")]),
        (axes[1, 0], "tool calls", [("tool_calls_per_prompt", "trajectories_per_prompt", "sampling, per trajectory"),
                                    ("test_tool_calls", None, "test, greedy, per question")]),
        (axes[1, 1], "sampling budget", [("chain_equivalents_per_prompt", None, "chain equivalents per prompt"),
                                         ("trajectories_per_chain_equivalent", None, "trajectories per chain eq.")]),
    ]
    for ax, title, lines in panels:
        for key, scale_by, label in lines:
            xs, ys = _series(rows, key, scale_by)
            if xs:
                ax.plot(xs, ys, marker="o", markersize=3, label=label)
        ax.set_title(title)
        ax.set_xlabel("iteration")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=8)
    return fig


def aggregate_granularity(rows: list[dict]) -> list[dict]:
    """Granularity rows of many iterations (`granularity()` rows) folded into one row per depth: counts summed,
    mean |ΔV| weighted by informative pairs, mean |advantage| weighted by nodes."""
    acc: dict[int, dict] = defaultdict(lambda: defaultdict(float))
    for r in rows:
        a = acc[r["depth"]]
        for k in ("nodes", "branch_points", "informative_sets", "informative_pairs", "preference_pairs"):
            a[k] += r[k]
        a["dv_sum"] += r["mean_abs_dv"] * r["informative_pairs"]
        if r.get("mean_abs_advantage") is not None:
            a["adv_sum"] += r["mean_abs_advantage"] * r["nodes"]
            a["adv_nodes"] += r["nodes"]
    out = []
    for depth in sorted(acc):
        a = acc[depth]
        out.append({
            "depth": depth, **{k: int(a[k]) for k in ("nodes", "branch_points", "informative_sets",
                                                      "informative_pairs", "preference_pairs")},
            "mean_abs_dv": a["dv_sum"] / a["informative_pairs"] if a["informative_pairs"] else 0.0,
            "mean_abs_advantage": a["adv_sum"] / a["adv_nodes"] if a["adv_nodes"] else 0.0,
        })
    return out


def granularity_figure(rows: list[dict], title: str = "") -> Figure:
    """Two panels by depth from `granularity()` rows (of one or many iterations, folded together)."""
    agg = aggregate_granularity(rows)
    depths = [r["depth"] for r in agg]
    fig = Figure(figsize=(11, 4), layout="constrained")
    left, right = fig.subplots(1, 2)
    width = 0.27
    for i, (key, label) in enumerate([("branch_points", "branch points"),
                                      ("informative_sets", "informative sibling sets"),
                                      ("preference_pairs", "preference pairs")]):
        left.bar([d + (i - 1) * width for d in depths], [r[key] for r in agg], width, label=label)
    left.set_title("sibling sets by depth")
    left.set_xlabel("depth of the compared steps (1 = first step)")
    left.legend(fontsize=8)
    right.plot(depths, [r["mean_abs_advantage"] for r in agg], marker="o", label="mean |advantage| of nodes")
    right.plot(depths, [r["mean_abs_dv"] for r in agg], marker="s", label="mean |ΔV| of informative sibling pairs")
    right.set_title("signal magnitude by depth")
    right.set_xlabel("depth")
    right.legend(fontsize=8)
    for ax in (left, right):
        ax.set_xticks(depths)
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    return fig
