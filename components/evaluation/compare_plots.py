"""The figures of a Tree-GRPO vs GRPO comparison: learning curves against generated tokens, and the budget sweep."""

from __future__ import annotations


def plot_curves(budgets: list[dict]):
    """A matplotlib figure: test EM vs cumulative generated tokens, seed means, one line per method and budget."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    markers = "osD^v<>p*h"
    for j, entry in enumerate(budgets):
        for i, (method, data) in enumerate(entry["methods"].items()):
            em = data["final_test_em"]
            budget = "" if entry["chains"] is None else f" B={entry['chains']:g}"
            ax.plot([p["generated_tokens"] for p in data["curve"]], [p["test_em"] for p in data["curve"]],
                    color=f"C{i}", marker=markers[j % len(markers)], linewidth=2,
                    label=f"{method}{budget}: {em['mean']:.3f} [{em['ci_low']:.3f}, {em['ci_high']:.3f}]")
    ax.set_xlabel("cumulative generated tokens (training samples)")
    ax.set_ylabel("test EM (greedy)")
    ax.set_title("Tree-GRPO vs GRPO at equal generated tokens per prompt")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def plot_budgets(table: list[dict]):
    """A matplotlib figure of the sweep against what each method realized: final greedy test EM (left) and the
    primary metric (middle) against realized generated tokens per prompt, one line per method and a point per
    budget; right, the Tree-GRPO − GRPO differences of both with their paired 95% intervals, per budget."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, middle, right) = plt.subplots(1, 3, figsize=(14, 4))
    for i, method in enumerate(("tree_grpo", "grpo")):
        xs = [r[f"{method}_generated_tokens"] for r in table]
        left.plot(xs, [r[f"{method}_em"] for r in table], color=f"C{i}", marker="o", label=method)
        if all(r.get(f"{method}_primary") is not None for r in table):
            middle.plot(xs, [r[f"{method}_primary"] for r in table], color=f"C{i}", marker="o", label=method)
        for x, r in zip(xs, table, strict=True):
            if r["chains"] is not None:
                left.annotate(f"B={r['chains']:g}", (x, r[f"{method}_em"]), fontsize=7, textcoords="offset points",
                              xytext=(0, 6))
    labels = [f"{r['chains']:g}" if r["chains"] is not None else f"{r['tokens_per_prompt']:.0f} tok" for r in table]
    pos = list(range(len(table)))
    for j, (key, low, high, name) in enumerate((("difference", "ci_low", "ci_high", "final greedy EM"),
                                                ("primary_difference", "primary_ci_low", "primary_ci_high",
                                                 "primary"))):
        rows = [(p, r) for p, r in zip(pos, table, strict=True) if r.get(key) is not None]
        if rows:
            right.errorbar([p + 0.1 * j for p, _ in rows], [r[key] for _, r in rows],
                           yerr=[[r[key] - r[low] for _, r in rows], [r[high] - r[key] for _, r in rows]],
                           marker="o", capsize=4, color=f"C{j + 2}", linestyle="none", label=name)
    right.axhline(0.0, color="grey", linewidth=1)
    right.set_xlim(-0.5, len(table) - 0.5)
    right.set_xticks(pos, labels)
    right.set_xlabel("budget (chains per prompt)")
    right.set_title("Tree-GRPO − GRPO, paired 95% interval")
    right.legend(fontsize=8)
    left.set_title("final test EM (greedy)")
    middle.set_title("primary: mean sampled test EM over evaluations")
    for ax in (left, middle):
        ax.set_xlabel("realized generated tokens per prompt")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    right.grid(alpha=0.3)
    fig.tight_layout()
    return fig
