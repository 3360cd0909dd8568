"""Generation budget of sampled trees: what each prompt and each expansion round cost.

Counts per prompt and per round: generated tokens, prefilled tokens (context fed to the model before
each turn), tool calls, trajectories (leaves), and the chain-equivalent budget — generated tokens
divided by the mean generated tokens of one full chain in the same batch (the round-0 chains), the unit
in which Tree-GRPO's paper compares trees with independent chains.
"""

from __future__ import annotations

from collections import defaultdict

from components.sampling.tree import Tree

COUNTS = ("generated_tokens", "prefilled_tokens", "tool_calls", "trajectories")


def _node_counts(node) -> dict[str, int]:
    s = node.step
    return {
        "generated_tokens": len(s.action_ids),
        "prefilled_tokens": s.prefilled,
        "tool_calls": int(s.action == "search" and bool(s.obs_ids)),
        "trajectories": int(node.is_leaf),
    }


def mean_chain_tokens(trees: list[Tree]) -> float:
    """Mean generated tokens of one full chain: each tree's round-0 chain, averaged over the batch."""
    chains = [sum(len(n.step.action_ids) for n in t.nodes if n.expansion_round == 0) for t in trees]
    return sum(chains) / len(chains) if chains else 0.0


def budget(trees: list[Tree]) -> tuple[dict[str, dict], dict[str, float]]:
    """(per-prompt stats, batch metrics). Per-prompt stats hold the COUNTS, `chain_equivalents` and a
    `rounds` list with the same counts per expansion round."""
    chain = mean_chain_tokens(trees)
    per_prompt: dict[str, dict] = {}
    per_round: dict[int, dict[str, int]] = defaultdict(lambda: dict.fromkeys(COUNTS, 0))
    for tree in trees:
        stats = per_prompt.setdefault(tree.prompt_id, {**dict.fromkeys(COUNTS, 0), "rounds": {}})
        for node in tree.nodes:
            counts = _node_counts(node)
            rnd = stats["rounds"].setdefault(node.expansion_round, dict.fromkeys(COUNTS, 0))
            for k, v in counts.items():
                stats[k] += v
                rnd[k] += v
                per_round[node.expansion_round][k] += v
    for stats in per_prompt.values():
        stats["chain_equivalents"] = stats["generated_tokens"] / chain if chain else 0.0
        stats["rounds"] = [{"round": r, **c} for r, c in sorted(stats["rounds"].items())]

    n = max(len(per_prompt), 1)
    metrics: dict[str, float] = {"prompts": len(per_prompt), "trees": len(trees), "mean_chain_tokens": chain}
    for k in COUNTS:
        total = sum(s[k] for s in per_prompt.values())
        metrics[k] = total
        metrics[f"{k}_per_prompt"] = total / n
    metrics["chain_equivalents_per_prompt"] = sum(s["chain_equivalents"] for s in per_prompt.values()) / n
    metrics["trajectories_per_chain_equivalent"] = (
        metrics["trajectories_per_prompt"] / metrics["chain_equivalents_per_prompt"]
        if metrics["chain_equivalents_per_prompt"] else 0.0
    )
    for r, counts in sorted(per_round.items()):
        for k, v in counts.items():
            metrics[f"round{r}_{k}"] = v
    return per_prompt, metrics
