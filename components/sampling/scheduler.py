"""Tree-GRPO random expansion over a batch of prompts (docs/design.md, Random expansion), and its chain case.

Per prompt: M trees, each started from one full chain. Then L rounds: for every tree draw N nodes from
{root} ∪ {non-leaf nodes} (uniformly with replacement under the default `random` policy; see `expansion` for the
others), and grow one new continuation to a new leaf from each (drawing the root starts a fresh chain). Every
live episode, of any prompt and round, advances in one batched turn. A tree ends with 1 + L·N leaves; with L = 0
the M trees are M independent chains (the GRPO baseline).
"""

from __future__ import annotations

import random

from arborl.components.config import AgentConfig, SamplingConfig
from arborl.components.sampling.agent import Episode, SearchEnv, frozen_heap, run_turn
from arborl.components.sampling.budget import allowances, fit_picks, predicted_costs
from arborl.components.sampling.expansion import make_policy
from arborl.components.sampling.generation import GenerationBackend
from arborl.components.sampling.rng import stable_seed
from arborl.components.sampling.tree import ROOT, Tree


def sample_trees(
    backend: GenerationBackend,
    env: SearchEnv,
    prompts: list[tuple[str, list[int]]],
    sampling: SamplingConfig,
    agent: AgentConfig,
    seed: int,
    tokens_per_prompt: int | None = None,
    max_rounds: int = 16,
    token_stop: str = "reach",
) -> list[Tree]:
    """Grow M trees per prompt; `prompts` holds (prompt_id, prompt token ids).

    Nodes to branch from are chosen by `sampling.expansion_policy`. With `tokens_per_prompt` the rounds
    go on per prompt until its generated tokens reach it (at most `max_rounds`); in chain mode (L = 0)
    each such round adds one more chain (a new tree) instead. `token_stop="nearest"` sizes the rounds to the
    budget instead (`budget.fit_picks`): a round keeps its branch points, taken from the trees in turn (chain
    mode: up to M new chains), while their predicted tokens (`budget.predicted_costs`) bring the prompt nearer it,
    spending at most half of what is left, and the prompt stops when a round keeps none. `token_stop="exact"` sizes
    the rounds the same way but spends the budget to the token: where a round would keep no pick while tokens are
    left it keeps the first, and each episode may generate only its share of what is left (`budget.allowances`), so
    the last one is usually cut short (finish reason `budget`). Every random choice belongs to
    one tree and every episode samples from its own seed, so a prompt's trees are the same whichever other
    prompts are sampled with it (sharding relies on this).

    Prompts move through their rounds independently: as soon as every episode of a prompt's round has
    ended, its trees grow the round's nodes and the next round's expansions join the very next batched
    turn, beside other prompts' unfinished episodes. The trees are exactly those of running the rounds one
    after the other (tested); the batches are just fuller and fewer.
    """
    policy = make_policy(sampling.expansion_policy, sampling.entropy_statistic)
    backend.clear_cache()  # reuse prefixes within this call only: a seed gives the same trees whatever ran before
    by_prompt = {pid: [Tree(pid, m, ids) for m in range(sampling.trees_per_prompt)] for pid, ids in prompts}
    rngs: dict[tuple[str, int], random.Random] = {}
    chain_mode = sampling.expansion_rounds == 0
    rounds = sampling.expansion_rounds if tokens_per_prompt is None else max_rounds
    if token_stop not in ("reach", "nearest", "exact"):
        raise ValueError(f"token_stop must be 'reach', 'nearest' or 'exact', not {token_stop!r}")
    nearest = tokens_per_prompt is not None and token_stop in ("nearest", "exact")
    exact = tokens_per_prompt is not None and token_stop == "exact"

    def tree_rng(tree: Tree) -> random.Random:
        key = (tree.prompt_id, tree.tree_id)
        return rngs.setdefault(key, random.Random(f"{seed}/{tree.prompt_id}/{tree.tree_id}"))

    def episodes_for(picks: list[tuple[Tree, int, int]], expansion_round: int,
                     caps: list[int | None] | None = None) -> list[Episode]:
        """picks: (tree, node to branch from, index of the pick within its tree and round); caps: their allowances."""
        return [
            Episode(tree.prefix(node), agent.max_turns - (0 if node == ROOT else tree.nodes[node].depth),
                    seed=stable_seed(seed, tree.prompt_id, tree.tree_id, expansion_round, k), allowance=cap)
            for (tree, node, k), cap in zip(picks, caps or [None] * len(picks), strict=True)
        ]

    def generated(trees: list[Tree]) -> int:
        return sum(len(n.step.action_ids) for t in trees for n in t.nodes)

    def next_picks(pid: str, r: int) -> tuple[list[tuple[Tree, int, int]], list[int] | None]:
        """Round r's branch points for prompt pid (none when its rounds or its token budget are done), and under an
        exact budget each one's allowance."""
        trees = by_prompt[pid]
        if r > rounds or (tokens_per_prompt is not None and generated(trees) >= tokens_per_prompt):
            return [], None
        left = tokens_per_prompt - generated(trees) if nearest else 0
        if chain_mode:  # under a token budget: more chains, new trees whose chain is their round 0
            count, costs = 1, [1.0]
            if nearest:
                costs = [max(predicted_costs(trees)[(0, ROOT)], 1.0)] * sampling.trees_per_prompt  # at most M a round
                count = max(fit_picks(costs, left), int(exact))
            new = [Tree(pid, len(trees) + i, trees[0].prompt_ids) for i in range(count)]
            trees += new
            return [(tree, ROOT, 0) for tree in new], allowances(costs[:count], left) if exact else None
        chosen = [policy.choose(tree, sampling.expansions_per_round, tree_rng(tree)) for tree in trees]
        if not nearest:
            return [(t, node, k) for t, nodes in zip(trees, chosen, strict=True) for k, node in enumerate(nodes)], None
        picks = [(tree, nodes[k], k) for k in range(sampling.expansions_per_round)
                 for tree, nodes in zip(trees, chosen, strict=True) if k < len(nodes)]
        predicted = predicted_costs(trees)
        costs = [predicted[(t.tree_id, node)] for t, node, _ in picks]
        count = fit_picks(costs, left)
        if exact:
            count = min(max(count, 1), len(picks))
            return picks[:count], allowances(costs[:count], left)
        return picks[:count], None

    # per prompt: (its current round, that round's picks, their episodes)
    running: dict[str, tuple[int, list, list[Episode]]] = {}
    for pid, trees in by_prompt.items():
        picks = [(t, ROOT, 0) for t in trees]
        caps = allowances([1.0] * len(picks), tokens_per_prompt) if exact else None  # the M chains share T evenly
        running[pid] = (0, picks, episodes_for(picks, 0, caps))
    with frozen_heap():
        while running:
            live = [e for _, _, eps in running.values() for e in eps]
            run_turn(backend, env, live, agent, sampling.temperature, greedy=False)
            for pid in [p for p, (_, _, eps) in running.items() if all(e.done for e in eps)]:
                r, picks, eps = running.pop(pid)
                for (tree, node, _), ep in zip(picks, eps, strict=True):
                    tree.attach(node, ep.steps, 0 if chain_mode else r)
                picks, caps = next_picks(pid, r + 1)
                if picks:
                    running[pid] = (r + 1, picks, episodes_for(picks, 0 if chain_mode else r + 1, caps))
    all_trees = [t for trees in by_prompt.values() for t in trees]
    if sampling.keep_leaves is not None:
        for tree in all_trees:
            tree.keep_leaves(sampling.keep_leaves, tree_rng(tree))
    return all_trees
