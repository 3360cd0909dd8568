"""Generation budget of sampled trees: what each prompt and each expansion round cost, and the one cost model
by which trees and chains are compared at equal cost.

Counts per prompt and per round: generated tokens, prefilled tokens (context fed to the model before
each turn), tool calls, trajectories (leaves), and the chain-equivalent budget — generated tokens
divided by the mean generated tokens of one full chain in the same batch (the round-0 chains), the unit
in which Tree-GRPO's paper compares trees with independent chains.

Cost model (docs/design.md, Budget): M trees with L rounds of N expansions cost
`planned_chains` = M · (1 + L·N·c) chains, c = `budget.expansion_cost`, the cost of one expansion relative
to a full chain (½ is the long-chain limit; `random_expansion_cost` measures it for a policy's chains).
Everything that trades trees against chains goes through it: `plan` turns a fixed budget
(`budget.chains_per_prompt`) into M/N/L (`arborl compare` sizes its trees with it), and
`equal_budget_chains` is the chain count whose planned cost equals a tree plan's.

Exact token budgets (`budget.tokens_per_prompt` with `budget.token_stop: nearest`): `predicted_costs` says what
one more continuation from each branch point of a prompt's trees is expected to generate, from the continuations
already there, and `fit_picks` keeps a round's branch points only while they bring the prompt nearer its budget.
With `token_stop: exact` the prompt spends the budget to the token: `allowances` caps each pick at its share of
what is left, and a round keeps at least one pick while anything is.
"""

from __future__ import annotations

import math
from collections import defaultdict
from typing import TYPE_CHECKING

from arborl.components.config import BudgetConfig, SamplingConfig

if TYPE_CHECKING:  # annotations only: the cost model needs no sampler
    from arborl.components.sampling.tree import Tree

COUNTS = ("generated_tokens", "prefilled_tokens", "tool_calls", "trajectories", "budget_cuts")


def _node_counts(node) -> dict[str, int]:
    s = node.step
    return {
        "generated_tokens": len(s.action_ids),
        "prefilled_tokens": s.prefilled,
        "tool_calls": int(s.action == "search" and bool(s.obs_ids)),
        "trajectories": int(node.is_leaf),
        "budget_cuts": int(s.finish_reason == "budget"),  # trajectories an exact token budget cut short
    }


def mean_chain_tokens(trees: list[Tree]) -> float:
    """Mean generated tokens of one full chain: each tree's round-0 chain, averaged over the batch."""
    chains = [sum(len(n.step.action_ids) for n in t.nodes if n.expansion_round == 0) for t in trees]
    return sum(chains) / len(chains) if chains else 0.0


def random_expansion_cost(trees: list[Tree]) -> float:
    """Expected cost, in chains, of one expansion under the official uniform draw over {root} ∪ non-leaf nodes,
    predicted from each tree's round-0 chain.

    A chain of d steps that generated g_1 … g_d tokens offers d nodes to draw: the root, which starts a fresh
    chain (expected cost: the mean generated tokens of its prompt's chains), and the d − 1 non-leaf steps, where
    drawing the one after step k regenerates what this chain spent after it, g_{k+1} + … + g_d (the only sample
    of that continuation there is). Returns the sum of those expectations over the chains ÷ the sum of their
    tokens: the `budget.expansion_cost` c of `planned_chains` for the policy that wrote them. The default ½ is
    the limit of long chains; d steps of equal length give (d + 1) / 2d (⅔ for three).
    """
    chains: dict[str, list[list[int]]] = defaultdict(list)
    for tree in trees:
        chain = [len(n.step.action_ids) for n in tree.nodes if n.expansion_round == 0]
        if chain:
            chains[tree.prompt_id].append(chain)
    expected = total = 0.0
    for prompt_chains in chains.values():
        fresh = sum(map(sum, prompt_chains)) / len(prompt_chains)
        for chain in prompt_chains:
            suffixes = [sum(chain[k:]) for k in range(1, len(chain))]
            expected += (fresh + sum(suffixes)) / len(chain)
            total += sum(chain)
    return expected / total if total else 0.0


def predicted_costs(trees: list[Tree]) -> dict[tuple[int, int], float]:
    """Generated tokens one more continuation is predicted to cost, per branch point of one prompt's trees:
    {(tree_id, node_id): tokens}, node_id −1 (`tree.ROOT`) for a fresh chain.

    From a non-leaf node n: the mean, over the leaves below n, of the tokens their paths generated after n (the
    samples of that very continuation there are). From the root: the mean generated tokens of the prompt's
    trajectories, over all its trees. Any expansion policy's picks are priced the same way.
    """
    after: dict[tuple[int, int], list[int]] = defaultdict(list)
    full: list[int] = []
    for tree in trees:
        for leaf in tree.leaves():
            path = tree.path(leaf.node_id)
            rest = sum(len(n.step.action_ids) for n in path)
            full.append(rest)
            for node in path[:-1]:
                rest -= len(node.step.action_ids)
                after[(tree.tree_id, node.node_id)].append(rest)
    fresh = sum(full) / len(full) if full else 0.0
    costs = {(tree.tree_id, -1): fresh for tree in trees}
    costs.update({k: sum(v) / len(v) for k, v in after.items()})
    return costs


ROUND_SHARE = 0.5  # an exact-budget round spends at most this share of what a prompt has left


def fit_picks(costs: list[float], left: float, share: float = ROUND_SHARE) -> int:
    """How many of a round's picks, taken in order, one round under an exact token budget keeps (`left`: the
    prompt's budget minus its generated tokens).

    A pick of predicted cost x (at least one token) joins while it brings the prompt nearer its budget — x is under
    twice what is still left — and, past the first pick, while the kept picks stay within `share` of `left`; the
    round ends at the first pick that does not (skipping it for a cheaper one would favour picks priced too low).
    Predictions come from few continuations, and a round that spent everything on them would overshoot exactly
    when they are low (more picks fit then); spending half of what is left per round lets the next round price its
    picks with more continuations seen. A prompt ends when a round keeps nothing: by predicted cost within half a
    pick of its budget, over or under, not always over as whole rounds do.
    """
    kept, spent = 0, 0.0
    for cost in costs:
        cost = max(cost, 1.0)
        if cost >= 2 * (left - spent) or (kept and spent + cost > share * left):
            break
        kept += 1
        spent += cost
    return kept


def allowances(costs: list[float], left: int) -> list[int]:
    """Split the `left` tokens of a prompt's exact budget among one round's picks, in proportion to their predicted
    costs (each at least one token, at least one token each): whole tokens that sum to `left` (or to the pick count
    where fewer tokens are left), the remainder going to the earliest picks. A round kept by `fit_picks` predicts
    at most about half of `left`, so a pick is cut only when it runs to about twice its price, or in a prompt's last
    round."""
    if not costs:
        return []
    weights = [max(c, 1.0) for c in costs]
    total = sum(weights)
    shares = [max(1, int(left * w / total)) for w in weights]
    for i in range(max(0, left - sum(shares))):
        shares[i % len(shares)] += 1
    return shares


def prompt_counts(trees: list[Tree]) -> dict[str, dict]:
    """Per prompt: the COUNTS, `trees`, and a `rounds` list with the COUNTS per expansion round. These
    depend on the prompt's own trees only, so shards' counts can be merged."""
    per_prompt: dict[str, dict] = {}
    for tree in trees:
        stats = per_prompt.setdefault(tree.prompt_id, {**dict.fromkeys(COUNTS, 0), "trees": 0, "rounds": {}})
        stats["trees"] += 1
        for node in tree.nodes:
            counts = _node_counts(node)
            rnd = stats["rounds"].setdefault(node.expansion_round, dict.fromkeys(COUNTS, 0))
            for k, v in counts.items():
                stats[k] += v
                rnd[k] += v
    for stats in per_prompt.values():
        stats["rounds"] = [{"round": r, **c} for r, c in sorted(stats["rounds"].items())]
    return per_prompt


def summarize(per_prompt: dict[str, dict]) -> tuple[dict[str, dict], dict[str, float]]:
    """Add `chain_equivalents` to every prompt's counts (from `prompt_counts`) and return batch metrics.

    The unit chain is the mean generated tokens of the round-0 chains of every tree in the batch.
    Entries without trees (prompts left out before sampling) are passed through and not counted.
    """
    sampled = {pid: s for pid, s in per_prompt.items() if s.get("trees")}
    n_trees = sum(s["trees"] for s in sampled.values())
    round0 = sum(r["generated_tokens"] for s in sampled.values() for r in s["rounds"] if r["round"] == 0)
    chain = round0 / n_trees if n_trees else 0.0
    per_round: dict[int, dict[str, int]] = defaultdict(lambda: dict.fromkeys(COUNTS, 0))
    for stats in sampled.values():
        stats["chain_equivalents"] = stats["generated_tokens"] / chain if chain else 0.0
        for r in stats["rounds"]:
            for k in COUNTS:
                per_round[r["round"]][k] += r[k]

    n = max(len(sampled), 1)
    metrics: dict[str, float] = {"prompts": len(sampled), "trees": n_trees, "mean_chain_tokens": chain}
    for k in COUNTS:
        total = sum(s[k] for s in sampled.values())
        metrics[k] = total
        metrics[f"{k}_per_prompt"] = total / n
    metrics["chain_equivalents_per_prompt"] = sum(s["chain_equivalents"] for s in sampled.values()) / n
    metrics["trajectories_per_chain_equivalent"] = (
        metrics["trajectories_per_prompt"] / metrics["chain_equivalents_per_prompt"]
        if metrics["chain_equivalents_per_prompt"] else 0.0
    )
    metrics["trees_per_prompt"] = n_trees / n
    metrics["expansion_rounds_per_prompt"] = sum(max(r["round"] for r in s["rounds"]) for s in sampled.values()) / n
    for r, counts in sorted(per_round.items()):
        for k, v in counts.items():
            metrics[f"round{r}_{k}"] = v
    return per_prompt, metrics


def budget(trees: list[Tree]) -> tuple[dict[str, dict], dict[str, float]]:
    """(per-prompt stats, batch metrics) of one batch of trees: `prompt_counts`, then `summarize`."""
    return summarize(prompt_counts(trees))


def _round_half_up(x: float) -> int:
    return int(math.floor(x + 0.5))


def planned_chains(sampling: SamplingConfig, expansion_cost: float) -> float:
    """Expected cost per prompt in chains of an M/N/L plan: M · (1 + L·N·c), c = `expansion_cost` (the cost of
    one expansion relative to a full chain). Chain mode (L = 0) costs M."""
    return sampling.trees_per_prompt * (
        1 + sampling.expansion_rounds * sampling.expansions_per_round * expansion_cost
    )


def _chain_count(chains: float) -> int:
    """Whole chains for a budget of `chains` chain equivalents: round half up, at least one."""
    return max(1, _round_half_up(chains))


def equal_budget_chains(sampling: SamplingConfig, expansion_cost: float) -> int:
    """Chains per prompt that cost what the M/N/L plan `sampling` costs: `planned_chains` rounded half up, at
    least one — the count `plan` gives a chain-mode run whose budget is that cost. 4 for Tree-GRPO's
    M = 2, N = 2, L = 1 at c = ½."""
    return _chain_count(planned_chains(sampling, expansion_cost))


def plan(sampling: SamplingConfig, fixed: BudgetConfig) -> SamplingConfig:
    """The M/N/L that meet `budget.chains_per_prompt` = B (the sampling config as given when it is null).

    Cost model (`planned_chains`, docs/design.md, Budget): a tree costs 1 + L·N·c chains,
    c = `budget.expansion_cost`. Chain mode (L = 0 configured) or B < 1 + c: M = round(B) chains. Tree mode:
    L = 1, M = round(B / (1 + N·c)) with the configured N, then N = round((B/M − 1) / c) spends what is left.
    B = 4, N = 2 gives Tree-GRPO's official M = 2, N = 2, L = 1. Rounding is half up.
    `budget.tokens_per_prompt` is met while sampling instead (see `scheduler.sample_trees`).
    """
    b, c = fixed.chains_per_prompt, fixed.expansion_cost
    if b is None:
        return sampling
    if sampling.expansion_rounds == 0 or b < 1 + c:
        return sampling.model_copy(update={"trees_per_prompt": _chain_count(b), "expansion_rounds": 0})
    tree = planned_chains(sampling.model_copy(update={"trees_per_prompt": 1, "expansion_rounds": 1}), c)
    m = max(1, _round_half_up(b / tree))
    n = max(1, _round_half_up((b / m - 1) / c))
    return sampling.model_copy(update={"trees_per_prompt": m, "expansions_per_round": n, "expansion_rounds": 1})
