"""The tree a prompt grows: nodes (agent steps) under the prompt, and the `nodes` rows they become.

A node is one agent step — the model's action tokens, then the tool's observation tokens. A tree starts as one
full chain; expansion rounds (see `scheduler`) hang new continuations under chosen nodes; a leaf is a step that
ended its episode. Node ids are dense and a parent's id is smaller than its children's.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field

from arborl.components.sampling.agent import Step

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


def node_rows(trees: list[Tree], policy_version: int) -> list[dict]:
    """Rows of the `nodes` table (docs/design.md, Data contracts), one per node."""
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
