"""Tree-GRPO vs GRPO at equal generation budget: the GRPO chain count that matches Tree-GRPO's cost, and the
aggregation of several runs per method into final test EM with a confidence interval over seeds and
EM-vs-generated-tokens curves.

Budget rule: the project's one cost model (`sampling.budget`, docs/design.md, Budget). A Tree-GRPO
prompt — its sampling after `budget.plan` — costs M · (1 + L·N·c) chains, c = `budget.expansion_cost` (the
cost of one expansion relative to a full chain), and the GRPO baseline gets `budget.equal_budget_chains` of
it: 4 chains for M=2, N=2, L=1 at the default c = ½, against Tree-GRPO's 6 trajectories. The generated tokens
each run actually spent are reported beside it, so the match can be checked.
"""

from __future__ import annotations

from arborl.components.config import Config
from arborl.components.evaluation.metrics import t_interval
from arborl.components.sampling.budget import equal_budget_chains, plan, planned_chains

METHODS = ("tree_grpo", "grpo")


def grpo_chains(cfg: Config) -> int:
    """Chains per prompt for GRPO that cost what one prompt's Tree-GRPO trees cost under `cfg.budget`."""
    return equal_budget_chains(plan(cfg.sampling, cfg.budget), cfg.budget.expansion_cost)


def budget_rule(cfg: Config) -> str:
    """One line that states how the GRPO chain count of `cfg`'s comparison was reached."""
    tree, c = plan(cfg.sampling, cfg.budget), cfg.budget.expansion_cost
    return (f"GRPO chains per prompt = round(M * (1 + L*N*c)) = round({tree.trees_per_prompt} * (1 + "
            f"{tree.expansion_rounds}*{tree.expansions_per_round}*{c:g})) = round({planned_chains(tree, c):g}) = "
            f"{grpo_chains(cfg)} (c = budget.expansion_cost, the cost of one expansion relative to a full chain)")


def method_config(cfg: Config, method: str, seed: int) -> Config:
    """The config of one comparison run: its own name and seed, no registry (compare runs are not candidates).
    GRPO runs chain mode with `grpo_chains(cfg)` chains per prompt; a `budget.chains_per_prompt` is set to that
    count so the sampler's `plan` keeps it."""
    data = cfg.model_dump(mode="json")
    data["run"].update({"name": f"{cfg.run.name}-{method}-s{seed}", "seed": seed})
    data["registry"]["enabled"] = False
    if method == "grpo":
        chains = grpo_chains(cfg)
        data["sampling"].update({"expansion_rounds": 0, "trees_per_prompt": chains})
        if cfg.budget.chains_per_prompt is not None:
            data["budget"]["chains_per_prompt"] = float(chains)
        data["advantage"]["estimator"] = "grpo"
    elif method != "tree_grpo":
        raise ValueError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    return Config.model_validate(data)


def run_curve(summary: dict) -> list[dict]:
    """Test EM after each evaluation against the cumulative generated tokens that preceded it (warm start = 0)."""
    points = [{"iteration": 0, "generated_tokens": 0, "test_em": summary["warmstart"]["test_em"]}]
    spent = 0
    for row in summary["history"]:
        spent += row["generated_tokens"]
        if "test_em" in row:
            points.append({"iteration": row["iteration"], "generated_tokens": spent, "test_em": row["test_em"]})
    return points


def aggregate(runs: dict[str, list[tuple[int, dict, Config]]]) -> dict:
    """{method: [(seed, summary, config), ...]} → per method: final test EM mean and 95% t-interval over
    seeds, per-seed values, generated tokens per prompt, and the seed-averaged EM-vs-tokens curve."""
    out: dict = {"methods": {}}
    for method, items in runs.items():
        finals = [s["final"]["test_em"] for _, s, _ in items]
        ci = t_interval(finals)
        curves = [run_curve(s) for _, s, _ in items]
        length = min(len(c) for c in curves)
        mean_curve = [
            {
                "iteration": curves[0][i]["iteration"],
                "generated_tokens": sum(c[i]["generated_tokens"] for c in curves) / len(curves),
                "test_em": sum(c[i]["test_em"] for c in curves) / len(curves),
            }
            for i in range(length)
        ]
        per_seed = []
        for (seed, summary, cfg), curve in zip(items, curves, strict=True):
            prompts = max(1, cfg.run.iterations * cfg.sampling.prompts_per_iteration)
            per_seed.append({
                "seed": seed, "run_name": cfg.run.name, "mlflow_run_id": summary.get("mlflow_run_id"),
                "final_test_em": summary["final"]["test_em"],
                "final_test_em_sampled": summary["final"]["test_em_sampled"],
                "generated_tokens": curve[-1]["generated_tokens"] if len(curve) > 1 else 0,
                "generated_tokens_per_prompt": sum(r["generated_tokens"] for r in summary["history"]) / prompts,
                "curve": curve,
            })
        first = items[0][2]
        out["methods"][method] = {
            "sampling": {"trees_per_prompt": first.sampling.trees_per_prompt,
                         "expansions_per_round": first.sampling.expansions_per_round,
                         "expansion_rounds": first.sampling.expansion_rounds,
                         "estimator": first.advantage.estimator},
            "final_test_em": {"mean": ci.estimate, "ci_low": ci.low, "ci_high": ci.high, "seeds": len(finals)},
            "generated_tokens_per_prompt": sum(p["generated_tokens_per_prompt"] for p in per_seed) / len(per_seed),
            "per_seed": per_seed,
            "curve": mean_curve,
        }
    return out


def plot_curves(result: dict):
    """A matplotlib figure: test EM vs cumulative generated tokens, per seed (thin) and seed mean (thick)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for i, (method, data) in enumerate(result["methods"].items()):
        color = f"C{i}"
        for run in data["per_seed"]:
            ax.plot([p["generated_tokens"] for p in run["curve"]], [p["test_em"] for p in run["curve"]],
                    color=color, alpha=0.3, linewidth=1)
        em = data["final_test_em"]
        label = f"{method}: {em['mean']:.3f} [{em['ci_low']:.3f}, {em['ci_high']:.3f}]"
        ax.plot([p["generated_tokens"] for p in data["curve"]], [p["test_em"] for p in data["curve"]], color=color,
                linewidth=2.5, marker="o", label=label)
    ax.set_xlabel("cumulative generated tokens (training samples)")
    ax.set_ylabel("test EM (greedy)")
    ax.set_title("Tree-GRPO vs GRPO at equal generation budget")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig
