"""Tree-GRPO vs GRPO at an equal generated-token budget per prompt, over seeds and a sweep of budgets: the runs'
configs, and the aggregation of their results into final test EM, paired differences, what each method spent and
how much signal its iterations carried.

Budget rule (docs/design.md, Budget). A budget is B chain equivalents per prompt. Per seed, one chain is the mean
generated tokens of one sampled answer of that seed's warm-start policy (`val_generated_tokens_sampled` of its
evaluation: the same agent loop, at evaluate.temperature), or with `budget.chain_unit: gold` of a gold chain
(`stages.warmstart.gold_chain_unit`), and both methods get the same budget of
T = round(B · chain) generated tokens per prompt at every iteration (`budget.tokens_per_prompt` with
`budget.token_stop: exact`). Tree-GRPO starts the M trees `budget.plan` gives for B and grows them by rounds of
up to N expansions per tree; GRPO starts as many chains and adds chains; each spends T to the token, its last
episodes cut where their share of T runs out (`budget_cuts`). A config with
`budget.tokens_per_prompt` and no sweep uses its T as it is. What each method actually spent per prompt
(generated and prefilled tokens, tool calls, trajectories) is reported, with the token mismatch between them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from arborl.components.advantages.signal import pool
from arborl.components.config import BudgetConfig, Config, SamplingConfig
from arborl.components.evaluation.metrics import Interval, t_interval
from arborl.components.sampling.budget import plan, planned_chains

METHODS = ("tree_grpo", "grpo")
CHAIN_METRICS = ("val_generated_tokens_sampled", "test_generated_tokens_sampled")  # the chain unit, first found
SPEND = ("generated_tokens", "prefilled_tokens", "tool_calls", "trajectories", "budget_cuts")


@dataclass
class RunRecord:
    """One comparison run and what it left: per iteration the sample stage's metrics and prompt_stats.json and
    the label stage's metrics, and the final evaluation's greedy test EM per question."""

    seed: int
    summary: dict
    config: Config
    sample: list[dict] = field(default_factory=list)
    prompt_stats: list[dict] = field(default_factory=list)
    label: list[dict] = field(default_factory=list)
    test_em: dict[str, float] = field(default_factory=dict)


# --- budgets and run configs --------------------------------------------------------------------------------------


def parse_budgets(text: str) -> list[float]:
    """'2,4,8' → [2.0, 4.0, 8.0]: chain equivalents per prompt, each > 0, no repeats, in the order given."""
    try:
        values = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"budgets {text!r} must be numbers separated by commas, e.g. 2,4,8") from None
    if not values or any(not math.isfinite(v) or v <= 0 for v in values):
        raise ValueError(f"budgets {text!r} must be positive chain equivalents, e.g. 2,4,8")
    if len(set(values)) != len(values):
        raise ValueError(f"budgets {text!r} repeat a value")
    return values


def sweep(cfg: Config, budgets: Sequence[float] | None = None) -> list[float | None]:
    """The budgets to compare at, in chain equivalents: `budgets` when given; otherwise one, the config's —
    None for a fixed `budget.tokens_per_prompt`, else `budget.chains_per_prompt`, else what the configured trees
    cost under the cost model (`budget.planned_chains`: 4 for M=2, N=2, L=1 at c = ½)."""
    if budgets:
        return list(budgets)
    if cfg.budget.tokens_per_prompt is not None:
        return [None]
    if cfg.budget.chains_per_prompt is not None:
        return [cfg.budget.chains_per_prompt]
    return [planned_chains(cfg.sampling, cfg.budget.expansion_cost)]


def chain_tokens(warmstart_metrics: dict) -> float:
    """The chain unit of a seed: mean generated tokens of one sampled answer of its warm-start evaluation."""
    for key in CHAIN_METRICS:
        if warmstart_metrics.get(key):
            return float(warmstart_metrics[key])
    raise ValueError(f"the warm-start evaluation has none of {', '.join(CHAIN_METRICS)}: no chain unit to size "
                     "budgets with (give budget.tokens_per_prompt instead)")


def token_budget(cfg: Config, chains: float | None, chain: float) -> int:
    """Generated tokens per prompt for B = `chains` chain equivalents of `chain` tokens, rounded half up (at least
    one); the config's `budget.tokens_per_prompt` when `chains` is None."""
    if chains is None:
        if cfg.budget.tokens_per_prompt is None:
            raise ValueError("a budget of None needs budget.tokens_per_prompt")
        return cfg.budget.tokens_per_prompt
    return max(1, int(math.floor(chains * chain + 0.5)))


def tree_sampling(cfg: Config, chains: float | None) -> SamplingConfig:
    """Tree-GRPO's M/N/L at B = `chains`: `budget.plan` of B (the configured M/N/L when `chains` is None)."""
    if chains is None:
        return cfg.sampling
    return plan(cfg.sampling, BudgetConfig(chains_per_prompt=chains, expansion_cost=cfg.budget.expansion_cost))


def run_name(cfg: Config, method: str, seed: int, chains: float | None = None) -> str:
    """`<name>-<method>-s<seed>`, with `-b<B>` after the name for a budget of a sweep."""
    budget = "" if chains is None else f"-b{chains:g}"
    return f"{cfg.run.name}{budget}-{method}-s{seed}"


def base_config(cfg: Config, seed: int) -> Config:
    """The run that makes one seed's world and warm start (and measures its chain unit) for every method and
    budget: no RL iterations, never registered."""
    data = cfg.model_dump(mode="json")
    data["run"].update({"name": f"{cfg.run.name}-base-s{seed}", "seed": seed, "iterations": 0})
    data["registry"]["enabled"] = False
    return Config.model_validate(data)


def method_config(cfg: Config, method: str, seed: int, tokens: int, chains: float | None = None,
                  name: str | None = None, warmstart_from: str | None = None) -> Config:
    """The config of one comparison run: a budget of `tokens` generated tokens per prompt met by
    `budget.token_stop: exact` (`nearest` where the config asks for it), its own name and seed, no registry (compare
    runs are not candidates).
    Tree-GRPO: the M/N/L of `tree_sampling(cfg, chains)`. GRPO: chain mode starting from as many chains, and the
    `grpo` estimator."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    tree = tree_sampling(cfg, chains)
    data = cfg.model_dump(mode="json")
    data["run"].update({"name": name or run_name(cfg, method, seed), "seed": seed})
    if warmstart_from is not None:
        data["run"]["warmstart_from"] = warmstart_from
    data["registry"]["enabled"] = False
    stop = "nearest" if cfg.budget.token_stop == "nearest" else "exact"  # never `reach`: it always overshoots T
    data["budget"].update({"tokens_per_prompt": tokens, "chains_per_prompt": None, "token_stop": stop})
    data["sampling"].update({"trees_per_prompt": tree.trees_per_prompt,
                             "expansions_per_round": tree.expansions_per_round,
                             "expansion_rounds": tree.expansion_rounds})
    if method == "grpo":
        data["sampling"]["expansion_rounds"] = 0
        data["advantage"]["estimator"] = "grpo"
    return Config.model_validate(data)


def budget_rule(cfg: Config, chains: list[float | None], units: dict[int, float]) -> str:
    """How the token budgets of a comparison were reached, in one paragraph."""
    unit = ", ".join(f"seed {s}: {u:.2f}" for s, u in sorted(units.items()))
    parts = []
    for b in chains:
        tree = tree_sampling(cfg, b)
        m, n = tree.trees_per_prompt, tree.expansions_per_round
        shape = f"Tree-GRPO M={m} trees, rounds of N={n} expansions per tree; GRPO {m} chains, then more chains"
        if b is None:
            parts.append(f"T = budget.tokens_per_prompt = {cfg.budget.tokens_per_prompt} ({shape})")
        else:
            ts = ", ".join(f"{token_budget(cfg, b, u)}" for _, u in sorted(units.items()))
            parts.append(f"B = {b:g}: T = round({b:g} x chain) = {ts} ({shape})")
    what = ("a gold chain (one exact search per hop, then the answer) over the validation questions"
            if cfg.budget.chain_unit == "gold" else "one sampled answer of the seed's warm-start policy")
    stop = ("budget.token_stop=nearest (rounds sized to T, ending within about half a pick of it)"
            if cfg.budget.token_stop == "nearest" else
            "budget.token_stop=exact (rounds sized to T, the last episodes cut where T runs out)")
    return ("Both methods get the same budget of T generated tokens per prompt at every iteration, met with "
            f"{stop}. One chain = mean generated tokens of {what} ({unit}). " + "; ".join(parts) + ".")


# --- aggregation ---------------------------------------------------------------------------------------------------


def run_curve(summary: dict) -> list[dict]:
    """Test EM after each evaluation against the cumulative generated tokens that preceded it (warm start = 0)."""
    points = [{"iteration": 0, "generated_tokens": 0, "test_em": summary["warmstart"]["test_em"]}]
    spent = 0
    for row in summary["history"]:
        spent += row["generated_tokens"]
        if "test_em" in row:
            points.append({"iteration": row["iteration"], "generated_tokens": spent, "test_em": row["test_em"]})
    return points


def spend(records: Sequence[RunRecord]) -> dict[str, float]:
    """What a method actually spent per prompt, pooled over its runs' iterations: `<count>_per_prompt` for
    generated and prefilled tokens, tool calls and trajectories; the budget T per prompt; and
    `budget_deviation`, the mean over prompts of |generated − T| / T."""
    totals = dict.fromkeys(SPEND, 0.0)
    prompts = 0
    deviations: list[float] = []
    budgets: list[float] = []
    for rec in records:
        target = rec.config.budget.tokens_per_prompt
        for stats in rec.prompt_stats:
            for s in stats.values():
                if not s.get("trees") or s.get("bad"):
                    continue
                prompts += 1
                for k in SPEND:
                    totals[k] += s.get(k, 0)  # a run without exact budgets may lack budget_cuts
                if target:
                    budgets.append(target)
                    deviations.append(abs(s["generated_tokens"] - target) / target)
    out = {f"{k}_per_prompt": v / prompts if prompts else 0.0 for k, v in totals.items()}
    out["prompts"] = prompts
    out["budget_tokens_per_prompt"] = sum(budgets) / len(budgets) if budgets else 0.0
    out["budget_deviation"] = sum(deviations) / len(deviations) if deviations else 0.0
    return out


def signal(records: Sequence[RunRecord]) -> dict:
    """The label-stage signal metrics (`advantages.signal`) pooled over seeds per iteration, and over everything."""
    n = min((len(r.label) for r in records), default=0)
    return {"per_iteration": [{"iteration": i + 1, **pool([r.label[i] for r in records])} for i in range(n)],
            "overall": pool([m for r in records for m in r.label])}


def paired_difference(diffs: dict[int, Sequence[float]], resamples: int = 2000, seed: int = 0,
                      level: float = 0.95) -> Interval:
    """Mean per-question difference (method a − method b) over seeds, with a paired two-stage bootstrap interval.

    `diffs` maps each seed to the differences on its questions (both methods of a seed answer the same questions).
    The estimate is the mean over seeds of each seed's mean difference. Each resample draws the seeds with
    replacement, then each drawn seed's questions with replacement, so the interval holds both the
    seed-to-seed and the question-to-question variation; with one seed it is the paired bootstrap over questions.
    """
    groups = [np.asarray(v, dtype=np.float64) for _, v in sorted(diffs.items()) if len(v)]
    if not groups:
        raise ValueError("paired_difference needs at least one seed with questions")
    estimate = float(np.mean([g.mean() for g in groups]))
    rng = np.random.default_rng(seed)
    means = np.empty(resamples)
    for i in range(resamples):
        picked = rng.integers(0, len(groups), size=len(groups))
        means[i] = np.mean([groups[j][rng.integers(0, groups[j].size, size=groups[j].size)].mean() for j in picked])
    tail = (1.0 - level) / 2.0
    low, high = np.quantile(means, [tail, 1.0 - tail])
    return Interval(estimate, float(low), float(high))


def question_differences(a: Sequence[RunRecord], b: Sequence[RunRecord]) -> dict[int, list[float]]:
    """Per seed: test EM of method a − method b on every question both runs of that seed answered."""
    by_seed = {r.seed: r for r in b}
    out: dict[int, list[float]] = {}
    for rec in a:
        other = by_seed.get(rec.seed)
        if other is not None:
            common = sorted(set(rec.test_em) & set(other.test_em))
            out[rec.seed] = [rec.test_em[q] - other.test_em[q] for q in common]
    return out


def aggregate(runs: dict[str, list[RunRecord]]) -> dict:
    """{method: [RunRecord, ...]} → per method: final test EM mean and 95% t-interval over seeds, per-seed values,
    generated tokens per prompt, what it spent (`spend`), its signal (`signal`) and the seed-averaged
    EM-vs-tokens curve."""
    out: dict = {"methods": {}}
    for method, items in runs.items():
        finals = [r.summary["final"]["test_em"] for r in items]
        ci = t_interval(finals)
        curves = [run_curve(r.summary) for r in items]
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
        for rec, curve in zip(items, curves, strict=True):
            prompts = max(1, rec.config.run.iterations * rec.config.sampling.prompts_per_iteration)
            per_seed.append({
                "seed": rec.seed, "run_name": rec.config.run.name, "mlflow_run_id": rec.summary.get("mlflow_run_id"),
                "final_test_em": rec.summary["final"]["test_em"],
                "final_test_em_sampled": rec.summary["final"]["test_em_sampled"],
                "tokens_per_prompt": rec.config.budget.tokens_per_prompt,
                "generated_tokens": curve[-1]["generated_tokens"] if len(curve) > 1 else 0,
                "generated_tokens_per_prompt": sum(r["generated_tokens"] for r in rec.summary["history"]) / prompts,
                "spend": spend([rec]),
                "curve": curve,
            })
        first = items[0].config
        out["methods"][method] = {
            "sampling": {"trees_per_prompt": first.sampling.trees_per_prompt,
                         "expansions_per_round": first.sampling.expansions_per_round,
                         "expansion_rounds": first.sampling.expansion_rounds,
                         "estimator": first.advantage.estimator},
            "final_test_em": {"mean": ci.estimate, "ci_low": ci.low, "ci_high": ci.high, "seeds": len(finals)},
            "generated_tokens_per_prompt": sum(p["generated_tokens_per_prompt"] for p in per_seed) / len(per_seed),
            "spend": spend(items),
            "signal": signal(items),
            "per_seed": per_seed,
            "curve": mean_curve,
        }
    return out


def compare_budget(chains: float | None, runs: dict[str, list[RunRecord]], resamples: int = 2000) -> dict:
    """One budget of the sweep: `aggregate`, then Tree-GRPO − GRPO test EM with its paired interval
    (`paired_difference`) and the token mismatch, Tree-GRPO's generated tokens per prompt ÷ GRPO's − 1."""
    out = {"chains": chains, **aggregate(runs)}
    tree, grpo = out["methods"]["tree_grpo"], out["methods"]["grpo"]
    out["tokens_per_prompt"] = {str(r.seed): r.config.budget.tokens_per_prompt for r in runs["tree_grpo"]}
    diffs = question_differences(runs["tree_grpo"], runs["grpo"])
    ci = paired_difference(diffs, resamples=resamples)
    out["difference"] = {"estimate": ci.estimate, "ci_low": ci.low, "ci_high": ci.high, "seeds": len(diffs),
                         "questions": sum(len(v) for v in diffs.values())}
    a, b = tree["spend"]["generated_tokens_per_prompt"], grpo["spend"]["generated_tokens_per_prompt"]
    out["token_mismatch"] = a / b - 1.0 if b else 0.0
    return out


def sweep_table(budgets: list[dict]) -> list[dict]:
    """The paper-style table: per budget, GRPO and Tree-GRPO test EM (seed means), their difference with its paired
    95% interval, and the generated and prefilled tokens and tool calls per prompt each spent."""
    rows = []
    for entry in budgets:
        tree, grpo = entry["methods"]["tree_grpo"], entry["methods"]["grpo"]
        row = {"chains": entry["chains"],
               "tokens_per_prompt": tree["spend"]["budget_tokens_per_prompt"],
               "grpo_em": grpo["final_test_em"]["mean"], "tree_grpo_em": tree["final_test_em"]["mean"],
               "difference": entry["difference"]["estimate"], "ci_low": entry["difference"]["ci_low"],
               "ci_high": entry["difference"]["ci_high"], "token_mismatch": entry["token_mismatch"]}
        for method, data in (("grpo", grpo), ("tree_grpo", tree)):
            for k in SPEND:
                row[f"{method}_{k}"] = data["spend"][f"{k}_per_prompt"]
        rows.append(row)
    return rows


# --- figures -------------------------------------------------------------------------------------------------------


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
    """A matplotlib figure of the sweep: test EM of both methods against the token budget per prompt, and the
    Tree-GRPO − GRPO difference with its paired 95% interval."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xs = [r["tokens_per_prompt"] for r in table]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for i, method in enumerate(("tree_grpo", "grpo")):
        left.plot(xs, [r[f"{method}_em"] for r in table], color=f"C{i}", marker="o", label=method)
    diff = [r["difference"] for r in table]
    err = [[d - r["ci_low"] for d, r in zip(diff, table, strict=True)],
           [r["ci_high"] - d for d, r in zip(diff, table, strict=True)]]
    right.errorbar(xs, diff, yerr=err, marker="o", capsize=4, color="C2")
    right.axhline(0.0, color="grey", linewidth=1)
    for x, r in zip(xs, table, strict=True):
        if r["chains"] is not None:
            left.annotate(f"B={r['chains']:g}", (x, r["tree_grpo_em"]), fontsize=7, textcoords="offset points",
                          xytext=(0, 6))
    left.set_title("test EM (greedy) at equal budget")
    right.set_title("Tree-GRPO − GRPO, paired 95% interval")
    for ax in (left, right):
        ax.set_xlabel("generated tokens per prompt (budget T)")
        ax.grid(alpha=0.3)
    left.set_ylabel("test EM")
    left.legend(fontsize=8)
    fig.tight_layout()
    return fig
