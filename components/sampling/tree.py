"""Tree-GRPO random expansion (DESIGN §4.2) and its chain special case.

Per prompt: M trees, each started from one full chain. Then L rounds: for every tree draw N nodes
from {root} ∪ {non-leaf nodes} (uniformly with replacement under the default `random` policy; see
`expansion` for the others), and grow one new continuation to a new leaf from each (drawing the root
starts a fresh chain). Every live episode, of any prompt and round, advances in one batched turn. A tree
ends with 1 + L·N leaves; with L = 0 the M trees are M independent chains (the GRPO baseline).
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field

from arborl.components.config import AgentConfig, SamplingConfig
from arborl.components.sampling.agent import Episode, SearchEnv, Step, frozen_heap, run_turn
from arborl.components.sampling.backend import HFBackend
from arborl.components.sampling.rng import stable_seed

ROOT = -1  # the prompt itself: drawing it starts a fresh chain


@dataclass
class Node:
    node_id: int
    parent_id: int | None
    depth: int  # 1 for a first agent step
    expansion_round: int
    step: Step
    children: list[int] = field(default_factory=list)

    @property
    def is_leaf(self) -> bool:
        return self.step.finish_reason is not None


@dataclass
class Tree:
    prompt_id: str
    tree_id: int
    prompt_ids: list[int]
    nodes: list[Node] = field(default_factory=list)

    def path(self, node_id: int) -> list[Node]:
        """Nodes from the first step down to `node_id`."""
        out = []
        while node_id is not None and node_id != ROOT:
            node = self.nodes[node_id]
            out.append(node)
            node_id = node.parent_id
        return out[::-1]

    def prefix(self, node_id: int) -> list[int]:
        """Prompt tokens plus every token of the path to `node_id` (its observation included)."""
        ids = list(self.prompt_ids)
        for node in self.path(node_id):
            ids += node.step.action_ids + node.step.obs_ids
        return ids

    def expandable(self) -> list[int]:
        return [ROOT] + [n.node_id for n in self.nodes if not n.is_leaf]

    def leaves(self) -> list[Node]:
        return [n for n in self.nodes if n.is_leaf]

    def attach(self, parent: int, steps: list[Step], expansion_round: int) -> None:
        parent_id = None if parent == ROOT else parent
        depth = 0 if parent_id is None else self.nodes[parent_id].depth
        for step in steps:
            node = Node(len(self.nodes), parent_id, depth + 1, expansion_round, step)
            self.nodes.append(node)
            if parent_id is not None:
                self.nodes[parent_id].children.append(node.node_id)
            parent_id, depth = node.node_id, node.depth

    def keep_leaves(self, k: int, rng: random.Random) -> None:
        """Keep k random leaves and the nodes on their paths; renumber nodes densely."""
        leaves = self.leaves()
        if len(leaves) <= k:
            return
        kept = {n.node_id for leaf in rng.sample(leaves, k) for n in self.path(leaf.node_id)}
        remap = {old: new for new, old in enumerate(sorted(kept))}
        nodes = []
        for old in sorted(kept):
            n = self.nodes[old]
            nodes.append(
                Node(remap[old], None if n.parent_id is None else remap[n.parent_id], n.depth,
                     n.expansion_round, n.step, [remap[c] for c in n.children if c in kept])
            )
        self.nodes = nodes


def sample_trees(
    backend: HFBackend,
    env: SearchEnv,
    prompts: list[tuple[str, list[int]]],
    sampling: SamplingConfig,
    agent: AgentConfig,
    seed: int,
    tokens_per_prompt: int | None = None,
    max_rounds: int = 16,
) -> list[Tree]:
    """Grow M trees per prompt; `prompts` holds (prompt_id, prompt token ids).

    Nodes to branch from are chosen by `sampling.expansion_policy`. With `tokens_per_prompt` the rounds
    go on per prompt until its generated tokens reach it (at most `max_rounds`); in chain mode (L = 0)
    each such round adds one more chain (a new tree) instead. Every random choice belongs to one tree
    and every episode samples from its own seed, so a prompt's trees are the same whichever other
    prompts are sampled with it (sharding relies on this).

    Prompts move through their rounds independently: as soon as every episode of a prompt's round has
    ended, its trees grow the round's nodes and the next round's expansions join the very next batched
    turn, beside other prompts' unfinished episodes. The trees are exactly those of running the rounds one
    after the other (tested); the batches are just fuller and fewer.
    """
    from arborl.components.sampling.expansion import make_policy  # expansion imports this module

    policy = make_policy(sampling.expansion_policy, sampling.entropy_statistic)
    backend.clear_cache()  # reuse prefixes within this call only: a seed gives the same trees whatever ran before
    by_prompt = {pid: [Tree(pid, m, ids) for m in range(sampling.trees_per_prompt)] for pid, ids in prompts}
    rngs: dict[tuple[str, int], random.Random] = {}
    chain_mode = sampling.expansion_rounds == 0
    rounds = sampling.expansion_rounds if tokens_per_prompt is None else max_rounds

    def tree_rng(tree: Tree) -> random.Random:
        key = (tree.prompt_id, tree.tree_id)
        return rngs.setdefault(key, random.Random(f"{seed}/{tree.prompt_id}/{tree.tree_id}"))

    def episodes_for(picks: list[tuple[Tree, int, int]], expansion_round: int) -> list[Episode]:
        """picks: (tree, node to branch from, index of the pick within its tree and round)."""
        return [
            Episode(tree.prefix(node), agent.max_turns - (0 if node == ROOT else tree.nodes[node].depth),
                    seed=stable_seed(seed, tree.prompt_id, tree.tree_id, expansion_round, k))
            for tree, node, k in picks
        ]

    def generated(trees: list[Tree]) -> int:
        return sum(len(n.step.action_ids) for t in trees for n in t.nodes)

    def next_picks(pid: str, r: int) -> list[tuple[Tree, int, int]]:
        """Round r's branch points for prompt pid (none when its rounds or its token budget are done)."""
        trees = by_prompt[pid]
        if r > rounds or (tokens_per_prompt is not None and generated(trees) >= tokens_per_prompt):
            return []
        if chain_mode:  # under a token budget: one more chain, a new tree whose chain is its round 0
            trees.append(Tree(pid, len(trees), trees[0].prompt_ids))
            return [(trees[-1], ROOT, 0)]
        picks = []
        for tree in trees:
            chosen = policy.choose(tree, sampling.expansions_per_round, tree_rng(tree))
            picks += [(tree, node, k) for k, node in enumerate(chosen)]
        return picks

    # per prompt: (its current round, that round's picks, their episodes)
    running: dict[str, tuple[int, list, list[Episode]]] = {}
    for pid, trees in by_prompt.items():
        picks = [(t, ROOT, 0) for t in trees]
        running[pid] = (0, picks, episodes_for(picks, 0))
    with frozen_heap():
        while running:
            live = [e for _, _, eps in running.values() for e in eps]
            run_turn(backend, env, live, agent, sampling.temperature, greedy=False)
            for pid in [p for p, (_, _, eps) in running.items() if all(e.done for e in eps)]:
                r, picks, eps = running.pop(pid)
                for (tree, node, _), ep in zip(picks, eps, strict=True):
                    tree.attach(node, ep.steps, 0 if chain_mode else r)
                picks = next_picks(pid, r + 1)
                if picks:
                    running[pid] = (r + 1, picks, episodes_for(picks, 0 if chain_mode else r + 1))
    all_trees = [t for trees in by_prompt.values() for t in trees]
    if sampling.keep_leaves is not None:
        for tree in all_trees:
            tree.keep_leaves(sampling.keep_leaves, tree_rng(tree))
    return all_trees


def node_rows(trees: list[Tree], policy_version: int) -> list[dict]:
    """Rows of the `nodes` table (DESIGN §3), one per node."""
    rows = []
    for tree in trees:
        for n in tree.nodes:
            s = n.step
            rows.append(
                {
                    "prompt_id": tree.prompt_id,
                    "tree_id": tree.tree_id,
                    "node_id": n.node_id,
                    "parent_id": n.parent_id,
                    "depth": n.depth,
                    "expansion_round": n.expansion_round,
                    "token_ids": s.action_ids + s.obs_ids,
                    "loss_mask": [True] * len(s.action_ids) + [False] * len(s.obs_ids),
                    "logprobs": s.action_logprobs + [math.nan] * len(s.obs_ids),
                    "text": s.action_text + s.obs_text,
                    "action": s.action,
                    "is_leaf": n.is_leaf,
                    "finish_reason": s.finish_reason,
                    "policy_version": policy_version,
                }
            )
    return rows
