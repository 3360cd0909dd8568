"""Tree-GRPO vs GRPO at equal cost, over seeds and a sweep of budgets: the budgets and the runs' configs. The
aggregation of the runs' results is in compare_stats.py, the figures in compare_plots.py.

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

from arborl.components.config import BudgetConfig, Config, SamplingConfig
from arborl.components.sampling.budget import plan, planned_chains

PRIMARY = "mean sampled test EM over the evaluations after the warm start"

METHODS = ("tree_grpo", "grpo")
CHAIN_METRICS = ("val_generated_tokens_sampled", "test_generated_tokens_sampled")  # the chain unit, first found


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
