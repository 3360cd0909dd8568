"""Tree-GRPO vs GRPO at equal cost: the aggregation of the comparison runs' results into final test EM, the
pre-registered primary metric (compare.PRIMARY), paired differences with bootstrap intervals, Tree-GRPO
interpolated at GRPO's realized tokens, what each method spent and how much signal its iterations carried, and the
sweep table. The budgets and the runs' configs are in compare.py."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from arborl.components.advantages.signal import pool
from arborl.components.config import Config
from arborl.components.evaluation.metrics import Interval, t_interval

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
