"""Dashboard figures of a run (matplotlib, no pyplot state, PNG through the Agg canvas).

* `curves_figure` — per-iteration curves: reward, exact match, tool calls, sampling budget.
* `granularity_figure` — by depth: branch points, informative sibling sets and preference pairs, and the
  mean |advantage| and mean |ΔV| (see components/advantages/preferences.py for the definitions).
* `stage_time_figure` — where the time went: the warm start's stages as one bar, then each iteration's stage
  seconds stacked.
* `champion_figure` — a registered model's gated versions: each challenger's gate metric and the champion's
  after each promotion.
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


STAGE_ORDER = ("prepare", "warmstart", "sample", "verify", "label", "train", "evaluate")


def stage_time_figure(seconds_by_step: dict[int, dict[str, float]], title: str = "") -> Figure:
    """Stacked stage seconds: step 0 (prepare, warm start, its evaluation) as one bar on the left panel, the
    RL iterations 1…N on the right (their own scale: the warm start usually dwarfs an iteration)."""
    stages = [s for s in STAGE_ORDER if any(s in d for d in seconds_by_step.values())]
    stages += sorted({s for d in seconds_by_step.values() for s in d} - set(stages))
    colors = {s: f"C{i}" for i, s in enumerate(stages)}
    fig = Figure(figsize=(11, 4), layout="constrained")
    warm, iters = fig.subplots(1, 2, width_ratios=[1, 5])
    warm_row = seconds_by_step.get(0, {})
    bottom = 0.0
    for s in stages:
        if warm_row.get(s):
            warm.bar(["warm start"], [warm_row[s]], bottom=bottom, color=colors[s], label=s)
            bottom += warm_row[s]
    warm.set_title(f"warm start: {bottom:.1f} s")
    warm.set_ylabel("seconds")
    steps = sorted(k for k in seconds_by_step if k > 0)
    bottoms = [0.0] * len(steps)
    for s in stages:
        values = [seconds_by_step[k].get(s, 0.0) for k in steps]
        if any(values):
            iters.bar(steps, values, bottom=bottoms, color=colors[s], label=s)
            bottoms = [b + v for b, v in zip(bottoms, values, strict=True)]
    iters.set_title(f"RL iterations: {sum(bottoms):.1f} s")
    iters.set_xlabel("iteration")
    iters.xaxis.set_major_locator(MaxNLocator(integer=True))
    handles = {h.get_label(): h for ax in (warm, iters) for h in ax.get_legend_handles_labels()[0]}
    if handles:
        iters.legend([handles[s] for s in stages if s in handles], [s for s in stages if s in handles], fontsize=8)
    for ax in (warm, iters):
        ax.grid(alpha=0.3, axis="y")
    if title:
        fig.suptitle(title)
    return fig


def champion_figure(rows: list[dict], title: str = "") -> Figure:
    """A registered model's gate metric across versions. `rows` (one per version, by version) hold `version`,
    `decision` (promote / reject / incomplete / None for never gated), `metric`, `challenger` and `baseline`
    (the gate's means) and `champion_after`. Points: each challenger; the step line: the champion's value after
    each promotion (the challenger's when promoted, else the baseline's, measured in the same promotion)."""
    fig = Figure(figsize=(8, 4), layout="constrained")
    ax = fig.subplots()
    gated = [r for r in rows if r.get("decision") in ("promote", "reject") and r.get("challenger") is not None]
    for decision, marker, color, label in (("promote", "o", "C2", "challenger, promoted"),
                                           ("reject", "x", "C3", "challenger, rejected")):
        pts = [(int(r["version"]), r["challenger"]) for r in gated if r["decision"] == decision]
        if pts:
            ax.scatter([p[0] for p in pts], [p[1] for p in pts], marker=marker, color=color, label=label)
    line = [(int(r["version"]), r["challenger"] if r["decision"] == "promote" else r.get("baseline"))
            for r in gated]
    line = [p for p in line if p[1] is not None]
    if line:
        ax.step([p[0] for p in line], [p[1] for p in line], where="post", color="C0", label="champion after the gate")
    metrics = sorted({str(r.get("metric")) for r in gated if r.get("metric")})
    ax.set_xlabel("registered version")
    ax.set_ylabel(f"gate metric ({', '.join(metrics) or 'none'})")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    if ax.collections or ax.lines:
        ax.legend(fontsize=8)
    ax.set_title(title or "champion's gate metric by version")
    return fig
