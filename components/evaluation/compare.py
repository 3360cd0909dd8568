"""Tree-GRPO vs GRPO at equal cost, over seeds and a sweep of budgets: the runs' configs, and the aggregation of
their results into final test EM, the pre-registered primary metric, paired differences, what each method spent
and how much signal its iterations carried.

Equal-cost rule (docs/design.md, Budget), `budget.protocol`:

* `shape` (default, Tree-GRPO's paper): a budget of B chains only chooses the shapes: GRPO samples B independent
  chains per prompt, Tree-GRPO the (M, N, L) of `budget.shapes[B]` ((1, 2, 1) at 2, (2, 2, 1) at 4, (4, 2, 1) at
  8, (4, 5, 1) at 16), else `budget.plan`'s. No episode is cut for a pool: chains and branches alike have the same
  root-relative caps (agent.max_turns, max_tokens_per_turn, max_total_tokens). What each method then realized per
  prompt (generated tokens, tool calls, trajectories) is reported, and Tree-GRPO's EM is interpolated at GRPO's
  realized tokens over the sweep.
* `tokens` (opt-in): both methods get T = round(B · chain) generated tokens per prompt at every iteration, one
  chain being the mean generated tokens of one sampled answer of the seed's warm start (`val_generated_tokens_sampled`)
  or, with `budget.chain_unit: gold`, of a gold chain; met with `budget.token_stop` `exact` (pool-cut trajectories
  are left out of the loss) or `nearest`.

The primary metric, fixed before the runs: the mean sampled test EM over a run's evaluations after the warm start
(iterations eval_every, 2·eval_every, …: the area under its learning curve), beside the final greedy test EM.
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

PRIMARY = "mean sampled test EM over the evaluations after the warm start"

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
    sampled_test_em: dict[int, dict[str, float]] = field(default_factory=dict)  # per evaluated iteration ≥ 1

    def primary_scores(self) -> dict[str, float]:
        """Per test question: its sampled EM averaged over the run's evaluations after the warm start."""
        evals = [self.sampled_test_em[it] for it in sorted(self.sampled_test_em)]
        if not evals:
            return {}
        common = set.intersection(*(set(e) for e in evals))
        return {q: sum(e[q] for e in evals) / len(evals) for q in sorted(common)}

    def primary(self) -> float:
        """The primary metric of the run: its mean sampled test EM over the evaluations after the warm start."""
        scores = self.primary_scores()
        return sum(scores.values()) / len(scores) if scores else math.nan


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


def uses_tokens(cfg: Config, chains: float | None) -> bool:
    """Whether a point of the sweep gives both methods a token pool per prompt (`budget.protocol: tokens`, or a
    fixed `budget.tokens_per_prompt` with no budget of chains) rather than shapes alone."""
    return chains is None or cfg.budget.protocol == "tokens"


def tree_sampling(cfg: Config, chains: float | None) -> SamplingConfig:
    """Tree-GRPO's M/N/L at B = `chains`: under `budget.protocol: shape` the shape `budget.shapes` lists for B,
    else (and under `tokens`) `budget.plan` of B; the configured M/N/L when `chains` is None."""
    if chains is None:
        return cfg.sampling
    shape = cfg.budget.shapes.get(float(chains)) if cfg.budget.protocol == "shape" else None
    if shape is not None:
        m, n, rounds = shape
        return cfg.sampling.model_copy(update={"trees_per_prompt": m, "expansions_per_round": n,
                                               "expansion_rounds": rounds})
    return plan(cfg.sampling, BudgetConfig(chains_per_prompt=chains, expansion_cost=cfg.budget.expansion_cost))


def chain_count(chains: float) -> int:
    """GRPO's independent chains per prompt at a budget of `chains` under `budget.protocol: shape`: B rounded half
    up, at least one."""
    return max(1, int(math.floor(chains + 0.5)))


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


def method_config(cfg: Config, method: str, seed: int, tokens: int | None, chains: float | None = None,
                  name: str | None = None, warmstart_from: str | None = None) -> Config:
    """The config of one comparison run: its own name and seed, no registry (compare runs are not candidates).

    Under `budget.protocol: shape` (`tokens` None): Tree-GRPO samples the (M, N, L) of `tree_sampling(cfg, chains)`
    and GRPO `chain_count(chains)` independent chains, with no token pool. Under `tokens`: both get `tokens`
    generated tokens per prompt, met with `budget.token_stop: exact` (`nearest` where the config asks for it);
    Tree-GRPO starts `tree_sampling`'s M trees and grows them by rounds, GRPO starts as many chains and adds chains.
    GRPO uses the `grpo` estimator."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    tree = tree_sampling(cfg, chains)
    data = cfg.model_dump(mode="json")
    data["run"].update({"name": name or run_name(cfg, method, seed), "seed": seed})
    if warmstart_from is not None:
        data["run"]["warmstart_from"] = warmstart_from
    data["registry"]["enabled"] = False
    data["sampling"].update({"trees_per_prompt": tree.trees_per_prompt,
                             "expansions_per_round": tree.expansions_per_round,
                             "expansion_rounds": tree.expansion_rounds})
    if tokens is None:
        if chains is None:
            raise ValueError("a comparison without a token budget needs a budget of chains")
        data["budget"].update({"tokens_per_prompt": None, "chains_per_prompt": None})
        if method == "grpo":
            data["sampling"]["trees_per_prompt"] = chain_count(chains)
    else:
        stop = "nearest" if cfg.budget.token_stop == "nearest" else "exact"  # never `reach`: it always overshoots T
        data["budget"].update({"tokens_per_prompt": tokens, "chains_per_prompt": None, "token_stop": stop})
    if method == "grpo":
        data["sampling"]["expansion_rounds"] = 0
        data["advantage"]["estimator"] = "grpo"
    return Config.model_validate(data)


def budget_rule(cfg: Config, chains: list[float | None], units: dict[int, float]) -> str:
    """How the budgets of a comparison were met, in one paragraph."""
    shapes = [b for b in chains if not uses_tokens(cfg, b)]
    pools = [b for b in chains if uses_tokens(cfg, b)]
    parts = []
    if shapes:
        listed = "; ".join(
            f"B = {b:g}: Tree-GRPO (M, N, L) = ({s.trees_per_prompt}, {s.expansions_per_round}, {s.expansion_rounds}), "
            f"GRPO {chain_count(b)} chains" for b in shapes for s in [tree_sampling(cfg, b)])
        parts.append("The budget of B chains per prompt only chooses the shapes (budget.protocol=shape): "
                     f"{listed}. No episode is cut for a token pool; every trajectory, chain or branch, has the same "
                     f"root-relative caps (agent.max_turns={cfg.agent.max_turns}, "
                     f"max_total_tokens={cfg.agent.max_total_tokens}), and each method's realized tokens, tool calls "
                     "and trajectories per prompt are reported.")
    if pools:
        unit = ", ".join(f"seed {s}: {u:.2f}" for s, u in sorted(units.items()))
        per = []
        for b in pools:
            tree = tree_sampling(cfg, b)
            m, n = tree.trees_per_prompt, tree.expansions_per_round
            shape = f"Tree-GRPO M={m} trees, rounds of N={n} expansions per tree; GRPO {m} chains, then more chains"
            if b is None:
                per.append(f"T = budget.tokens_per_prompt = {cfg.budget.tokens_per_prompt} ({shape})")
            else:
                ts = ", ".join(f"{token_budget(cfg, b, u)}" for _, u in sorted(units.items()))
                per.append(f"B = {b:g}: T = round({b:g} x chain) = {ts} ({shape})")
        what = ("a gold chain (one exact search per hop, then the answer) over the validation questions"
                if cfg.budget.chain_unit == "gold" else "one sampled answer of the seed's warm-start policy")
        stop = ("budget.token_stop=nearest (rounds sized to T, ending within about half a pick of it)"
                if cfg.budget.token_stop == "nearest" else
                "budget.token_stop=exact (rounds sized to T, the last episodes cut where T runs out and left out of "
                "the loss)")
        parts.append("Both methods get the same budget of T generated tokens per prompt at every iteration, met with "
                     f"{stop}. One chain = mean generated tokens of {what} ({unit}). " + "; ".join(per) + ".")
    parts.append(f"Primary metric: {PRIMARY}.")
    return " ".join(parts)


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


def question_differences(a: Sequence[RunRecord], b: Sequence[RunRecord], metric: str = "final"
                         ) -> dict[int, list[float]]:
    """Per seed: method a − method b on every test question both runs of that seed answered; `metric` "final" is
    the final greedy EM, "primary" the primary metric (sampled EM averaged over the evaluations)."""
    scores = (lambda r: r.test_em) if metric == "final" else (lambda r: r.primary_scores())
    by_seed = {r.seed: r for r in b}
    out: dict[int, list[float]] = {}
    for rec in a:
        other = by_seed.get(rec.seed)
        if other is not None:
            mine, theirs = scores(rec), scores(other)
            common = sorted(set(mine) & set(theirs))
            out[rec.seed] = [mine[q] - theirs[q] for q in common]
    return out


def interpolated_difference(tree_points: Sequence[tuple[float, Sequence[RunRecord]]], tokens: float,
                            grpo: Sequence[RunRecord], metric: str = "final", resamples: int = 2000
                            ) -> dict | None:
    """Tree-GRPO's score interpolated at `tokens` realized generated tokens per prompt (GRPO's, at one budget),
    minus GRPO's, with its paired interval; None where `tokens` lies outside the Tree-GRPO budgets' realized range.

    `tree_points`: (realized tokens per prompt, that budget's Tree-GRPO runs) over the sweep. Between the two
    budgets around `tokens`, per seed and question, the interpolated score is w·score_lo + (1 − w)·score_hi with
    w = (x_hi − tokens) / (x_hi − x_lo), linear in the realized tokens; the difference to GRPO's score on the same
    question is then bootstrapped like any paired difference (`paired_difference`)."""
    points = sorted(tree_points, key=lambda p: p[0])
    around = [(a, b) for a, b in zip(points, points[1:], strict=False) if a[0] <= tokens <= b[0] and b[0] > a[0]]
    if around:
        (x_lo, lo), (x_hi, hi) = around[0]
        w = (x_hi - tokens) / (x_hi - x_lo)
    else:
        exact = [runs for x, runs in points if x == tokens]
        if not exact:
            return None
        lo = hi = exact[0]
        w = 1.0
    scores = (lambda r: r.test_em) if metric == "final" else (lambda r: r.primary_scores())
    lo_by, hi_by = {r.seed: scores(r) for r in lo}, {r.seed: scores(r) for r in hi}
    diffs: dict[int, list[float]] = {}
    for rec in grpo:
        if rec.seed in lo_by and rec.seed in hi_by:
            mine = scores(rec)
            common = sorted(set(mine) & set(lo_by[rec.seed]) & set(hi_by[rec.seed]))
            diffs[rec.seed] = [w * lo_by[rec.seed][q] + (1 - w) * hi_by[rec.seed][q] - mine[q] for q in common]
    if not any(diffs.values()):
        return None
    ci = paired_difference(diffs, resamples=resamples)
    return {"tokens": tokens, "estimate": ci.estimate, "ci_low": ci.low, "ci_high": ci.high}


def aggregate(runs: dict[str, list[RunRecord]]) -> dict:
    """{method: [RunRecord, ...]} → per method: final test EM mean and 95% t-interval over seeds, per-seed values,
    generated tokens per prompt, what it spent (`spend`), its signal (`signal`) and the seed-averaged
    EM-vs-tokens curve."""
    out: dict = {"methods": {}}
    for method, items in runs.items():
        finals = [r.summary["final"]["test_em"] for r in items]
        ci = t_interval(finals)
        primaries = [r.primary() for r in items]
        primary = t_interval(primaries) if all(math.isfinite(p) for p in primaries) else None
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
                "primary": rec.primary(),
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
            "primary": None if primary is None else {"mean": primary.estimate, "ci_low": primary.low,
                                                     "ci_high": primary.high, "seeds": len(primaries)},
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
    primary = question_differences(runs["tree_grpo"], runs["grpo"], "primary")
    if any(primary.values()):
        ci = paired_difference(primary, resamples=resamples)
        out["primary_difference"] = {"estimate": ci.estimate, "ci_low": ci.low, "ci_high": ci.high,
                                     "seeds": len(primary), "questions": sum(len(v) for v in primary.values())}
    else:
        out["primary_difference"] = None
    a, b = tree["spend"]["generated_tokens_per_prompt"], grpo["spend"]["generated_tokens_per_prompt"]
    out["token_mismatch"] = a / b - 1.0 if b else 0.0
    return out


def add_interpolations(budgets: list[dict], runs: list[dict[str, list[RunRecord]]], resamples: int = 2000) -> None:
    """Give every budget entry `tree_at_grpo_tokens`: Tree-GRPO's final greedy and primary scores interpolated at
    GRPO's realized generated tokens per prompt over the sweep, minus GRPO's (`interpolated_difference`), each None
    where GRPO's tokens lie outside Tree-GRPO's realized range."""
    tree_points = [(e["methods"]["tree_grpo"]["spend"]["generated_tokens_per_prompt"], r["tree_grpo"])
                   for e, r in zip(budgets, runs, strict=True)]
    for entry, by_method in zip(budgets, runs, strict=True):
        tokens = entry["methods"]["grpo"]["spend"]["generated_tokens_per_prompt"]
        entry["tree_at_grpo_tokens"] = {
            metric: interpolated_difference(tree_points, tokens, by_method["grpo"], metric, resamples)
            for metric in ("final", "primary")}


def sweep_table(budgets: list[dict]) -> list[dict]:
    """The paper-style table: per budget, GRPO and Tree-GRPO final greedy test EM and primary metric (seed means),
    their differences with paired 95% intervals, Tree-GRPO interpolated at GRPO's realized tokens, and what each
    realized per prompt: generated and prefilled tokens, tool calls, trajectories, pool cuts."""
    rows = []
    for entry in budgets:
        tree, grpo = entry["methods"]["tree_grpo"], entry["methods"]["grpo"]
        row = {"chains": entry["chains"],
               "tokens_per_prompt": tree["spend"]["budget_tokens_per_prompt"],
               "grpo_em": grpo["final_test_em"]["mean"], "tree_grpo_em": tree["final_test_em"]["mean"],
               "difference": entry["difference"]["estimate"], "ci_low": entry["difference"]["ci_low"],
               "ci_high": entry["difference"]["ci_high"], "token_mismatch": entry["token_mismatch"]}
        primary = entry.get("primary_difference")
        row.update({
            "grpo_primary": (grpo.get("primary") or {}).get("mean"),
            "tree_grpo_primary": (tree.get("primary") or {}).get("mean"),
            "primary_difference": primary and primary["estimate"],
            "primary_ci_low": primary and primary["ci_low"], "primary_ci_high": primary and primary["ci_high"]})
        for metric, interp in (entry.get("tree_at_grpo_tokens") or {}).items():
            for key in ("estimate", "ci_low", "ci_high"):
                row[f"interpolated_{metric}_{key}"] = interp and interp[key]
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
