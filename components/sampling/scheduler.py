"""Tree-GRPO random expansion over a batch of prompts (docs/design.md, Random expansion), and its chain case.

Per prompt: M trees, each started from one full chain. Then L rounds: for every tree draw N nodes from
{root} ∪ {non-leaf nodes} (uniformly with replacement under the default `random` policy; see `expansion` for the
others), and grow one new continuation to a new leaf from each (drawing the root starts a fresh chain). Every
live episode, of any prompt and round, advances in one batched turn. A tree ends with 1 + L·N leaves; with L = 0
the M trees are M independent chains (the GRPO baseline).

With a token budget (`budget.tokens_per_prompt`) the rounds go on per prompt until it is spent: one class per
budget mode (`FixedRounds` without one, `ReachTokens`, `NearestTokens`, `ExactTokens` for `budget.token_stop`)
says when a prompt is done and which picks each of its rounds keeps.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from arborl.components.config import AgentConfig, SamplingConfig
from arborl.components.sampling.agent import Episode, SearchEnv, frozen_heap, run_turn
from arborl.components.sampling.budget import allowances, fit_picks, predicted_costs
from arborl.components.sampling.expansion import ExpansionPolicy, make_policy
from arborl.components.sampling.generation import GenerationBackend
from arborl.components.sampling.rng import stable_seed
from arborl.components.sampling.tree import ROOT, Tree

TOKEN_STOPS = ("reach", "nearest", "exact")

# (tree, node to branch from, index of the pick within its tree and round)
Pick = tuple[Tree, int, int]


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
    rngs = TreeRngs(seed)
    budget = make_budget(sampling, policy, rngs, tokens_per_prompt, max_rounds, token_stop)
    chain_mode = sampling.expansion_rounds == 0  # every chain is round 0 of its own tree

    running: dict[str, PromptRound] = {}  # per prompt: its round in progress
    for pid, trees in by_prompt.items():
        picks = [(tree, ROOT, 0) for tree in trees]
        caps = budget.first_allowances(len(picks))
        running[pid] = PromptRound(0, picks, start_episodes(picks, caps, 0, seed, agent))
    with frozen_heap():
        while running:
            live = [e for rnd in running.values() for e in rnd.episodes]
            run_turn(backend, env, live, agent, sampling.temperature, greedy=False)
            ended = [pid for pid, rnd in running.items() if all(e.done for e in rnd.episodes)]
            for pid in ended:
                rnd = running.pop(pid)
                for (tree, node, _), ep in zip(rnd.picks, rnd.episodes, strict=True):
                    tree.attach(node, ep.steps, 0 if chain_mode else rnd.number)
                r = rnd.number + 1
                picks, caps = budget.next_round(by_prompt[pid], r)
                if picks:
                    expansion_round = 0 if chain_mode else r
                    running[pid] = PromptRound(r, picks, start_episodes(picks, caps, expansion_round, seed, agent))
    all_trees = [t for trees in by_prompt.values() for t in trees]
    if sampling.keep_leaves is not None:
        for tree in all_trees:
            tree.keep_leaves(sampling.keep_leaves, rngs.of(tree))
    return all_trees


@dataclass
class PromptRound:
    """A prompt's round in progress: its number, its picks and their episodes."""

    number: int
    picks: list[Pick]
    episodes: list[Episode]


def start_episodes(picks: list[Pick], caps: list[int | None], expansion_round: int, seed: int,
             agent: AgentConfig) -> list[Episode]:
    """One episode per pick, continuing its tree from the picked node, with its own sampling seed and allowance."""
    return [
        Episode(tree.prefix(node), agent.max_turns - (0 if node == ROOT else tree.nodes[node].depth),
                seed=stable_seed(seed, tree.prompt_id, tree.tree_id, expansion_round, k), allowance=cap)
        for (tree, node, k), cap in zip(picks, caps, strict=True)
    ]


class FixedRounds:
    """No token budget: the L configured rounds, in each of which every tree branches from the N nodes its
    expansion policy draws. Chain mode (L = 0) has no round after the M chains.

    The token budgets below change when a prompt stops (`done`), and, for `nearest` and `exact`, which of a round's
    picks it keeps and how many tokens each may generate.
    """

    def __init__(self, sampling: SamplingConfig, policy: ExpansionPolicy, rngs: TreeRngs):
        self.sampling = sampling
        self.policy = policy
        self.rngs = rngs
        self.chain_mode = sampling.expansion_rounds == 0
        self.rounds = sampling.expansion_rounds

    def first_allowances(self, count: int) -> list[int | None]:
        """Allowances of round 0's `count` chains (None: no cap)."""
        return [None] * count

    def next_round(self, trees: list[Tree], r: int) -> tuple[list[Pick], list[int | None]]:
        """Round r's picks for one prompt's trees and each one's allowance; no picks once the prompt is done.
        In chain mode the picks start new trees, which are appended to `trees`."""
        if self.done(trees, r):
            return [], []
        if self.chain_mode:
            return self.more_chains(trees)
        return self.branch_points(trees)

    def done(self, trees: list[Tree], r: int) -> bool:
        return r > self.rounds

    def more_chains(self, trees: list[Tree]) -> tuple[list[Pick], list[int | None]]:
        """Chain mode: one more chain (a token budget's round: without one there is no round after the first)."""
        return add_chains(trees, 1), [None]

    def branch_points(self, trees: list[Tree]) -> tuple[list[Pick], list[int | None]]:
        """Tree mode: every drawn node, tree by tree."""
        chosen = self.choose(trees)
        picks = [(tree, node, k) for tree, nodes in zip(trees, chosen, strict=True) for k, node in enumerate(nodes)]
        return picks, [None] * len(picks)

    def choose(self, trees: list[Tree]) -> list[list[int]]:
        """The N nodes the expansion policy draws in each tree, from the tree's own generator, tree by tree."""
        return [self.policy.choose(tree, self.sampling.expansions_per_round, self.rngs.of(tree)) for tree in trees]


class ReachTokens(FixedRounds):
    """`token_stop: reach`: whole rounds (chain mode: one more chain each) until the prompt's generated tokens
    reach the budget, at most `max_rounds`."""

    def __init__(self, sampling: SamplingConfig, policy: ExpansionPolicy, rngs: TreeRngs, tokens: int,
                 max_rounds: int):
        super().__init__(sampling, policy, rngs)
        self.tokens = tokens
        self.rounds = max_rounds

    def done(self, trees: list[Tree], r: int) -> bool:
        return r > self.rounds or generated_tokens(trees) >= self.tokens


class NearestTokens(ReachTokens):
    """`token_stop: nearest`: a round keeps its picks, taken in order, while their predicted tokens bring the
    prompt nearer its budget (`budget.fit_picks`); the prompt stops when a round keeps none. Tree mode takes the
    picks from the trees in turn (every tree's first pick, then every tree's second, …); chain mode offers up to
    M new chains, each priced at a fresh chain."""

    def more_chains(self, trees: list[Tree]) -> tuple[list[Pick], list[int | None]]:
        left = self.tokens - generated_tokens(trees)
        costs = [max(predicted_costs(trees)[(0, ROOT)], 1.0)] * self.sampling.trees_per_prompt
        count = self.keep(costs, left)
        return add_chains(trees, count), self.caps(costs[:count], left)

    def branch_points(self, trees: list[Tree]) -> tuple[list[Pick], list[int | None]]:
        left = self.tokens - generated_tokens(trees)
        chosen = self.choose(trees)
        picks = [(tree, nodes[k], k) for k in range(self.sampling.expansions_per_round)
                 for tree, nodes in zip(trees, chosen, strict=True) if k < len(nodes)]
        predicted = predicted_costs(trees)
        costs = [predicted[(tree.tree_id, node)] for tree, node, _ in picks]
        count = self.keep(costs, left)
        return picks[:count], self.caps(costs[:count], left)

    def keep(self, costs: list[float], left: int) -> int:
        """How many of a round's picks, priced `costs`, the round keeps with `left` tokens to go."""
        return fit_picks(costs, left)

    def caps(self, costs: list[float], left: int) -> list[int | None]:
        """The kept picks' allowances."""
        return [None] * len(costs)


class ExactTokens(NearestTokens):
    """`token_stop: exact`: rounds sized as under `nearest`, but the budget is spent to the token: a round keeps
    at least its first pick while tokens are left, and each episode may generate only its share of what is left
    (`budget.allowances`; the M first chains share the whole budget evenly)."""

    def first_allowances(self, count: int) -> list[int | None]:
        return allowances([1.0] * count, self.tokens)

    def keep(self, costs: list[float], left: int) -> int:
        return min(max(fit_picks(costs, left), 1), len(costs))

    def caps(self, costs: list[float], left: int) -> list[int | None]:
        return allowances(costs, left)


def make_budget(sampling: SamplingConfig, policy: ExpansionPolicy, rngs: TreeRngs, tokens_per_prompt: int | None,
                max_rounds: int, token_stop: str) -> FixedRounds:
    """The budget mode of `budget.tokens_per_prompt` and `budget.token_stop`."""
    if token_stop not in TOKEN_STOPS:
        raise ValueError(f"token_stop must be 'reach', 'nearest' or 'exact', not {token_stop!r}")
    if tokens_per_prompt is None:
        return FixedRounds(sampling, policy, rngs)
    mode = {"reach": ReachTokens, "nearest": NearestTokens, "exact": ExactTokens}[token_stop]
    return mode(sampling, policy, rngs, tokens_per_prompt, max_rounds)


def add_chains(trees: list[Tree], count: int) -> list[Pick]:
    """Chain mode: `count` new trees of the prompt, appended to `trees`; their chain is their round 0."""
    new = [Tree(trees[0].prompt_id, len(trees) + i, trees[0].prompt_ids) for i in range(count)]
    trees += new
    return [(tree, ROOT, 0) for tree in new]


class TreeRngs:
    """Each tree's own `random.Random`, seeded from (seed, prompt, tree) when the tree first draws."""

    def __init__(self, seed: int):
        self.seed = seed
        self.rngs: dict[tuple[str, int], random.Random] = {}

    def of(self, tree: Tree) -> random.Random:
        key = (tree.prompt_id, tree.tree_id)
        if key not in self.rngs:
            self.rngs[key] = random.Random(f"{self.seed}/{tree.prompt_id}/{tree.tree_id}")
        return self.rngs[key]


def generated_tokens(trees: list[Tree]) -> int:
    """Tokens the policy generated in these trees."""
    return sum(len(n.step.action_ids) for t in trees for n in t.nodes)
