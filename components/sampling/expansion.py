"""Expansion policies: which nodes of a tree the next round branches from.

A policy is `choose(tree, n, rng) -> n node ids`, each either `ROOT` (start a fresh chain) or a non-leaf
node (continue after its observation). `rng` is the tree's own `random.Random`, so a tree's choices do
not depend on which other trees share the batch.

* `random` — Tree-GRPO's official rule: n draws uniformly, with replacement, from {root} ∪ non-leaf nodes.
* `entropy` — TreeRL EPTree-style: fork where the policy was least certain. A node's uncertainty is the
  max (or mean) over its action tokens of −log p(token), the surprisal of the sampled token — a one-sample
  estimate of the token entropy that needs nothing but the behaviour log-probs already stored. Non-leaf
  nodes are ranked by it (ties in random order), the root last; the n picks walk that ranking from the
  top and wrap around when n exceeds it.
* `depth` — depth-stratified: draw a depth uniformly among the depths present (root = depth 0), then a
  node uniformly within that depth; n draws with replacement. Rare deep (or shallow) steps get as many
  branches as common ones.
"""

from __future__ import annotations

import random
from typing import Protocol

from arborl.components.sampling.tree import ROOT, Tree


class ExpansionPolicy(Protocol):
    def choose(self, tree: Tree, n: int, rng: random.Random) -> list[int]: ...


class RandomPolicy:
    def choose(self, tree: Tree, n: int, rng: random.Random) -> list[int]:
        candidates = tree.expandable()
        return [rng.choice(candidates) for _ in range(n)]


class EntropyPolicy:
    def __init__(self, statistic: str = "max"):
        if statistic not in ("max", "mean"):
            raise ValueError(f"entropy statistic must be 'max' or 'mean', got {statistic!r}")
        self.statistic = statistic

    def uncertainty(self, tree: Tree, node_id: int) -> float:
        """max or mean −log p over the node's action tokens (0 for a step without tokens)."""
        surprisal = [-lp for lp in tree.nodes[node_id].step.action_logprobs]
        if not surprisal:
            return 0.0
        return max(surprisal) if self.statistic == "max" else sum(surprisal) / len(surprisal)

    def choose(self, tree: Tree, n: int, rng: random.Random) -> list[int]:
        inner = [c for c in tree.expandable() if c != ROOT]
        tiebreak = {c: rng.random() for c in inner}
        ranking = sorted(inner, key=lambda c: (-self.uncertainty(tree, c), tiebreak[c])) + [ROOT]
        return [ranking[k % len(ranking)] for k in range(n)]


class DepthStratifiedPolicy:
    def choose(self, tree: Tree, n: int, rng: random.Random) -> list[int]:
        by_depth: dict[int, list[int]] = {}
        for c in tree.expandable():
            by_depth.setdefault(0 if c == ROOT else tree.nodes[c].depth, []).append(c)
        depths = sorted(by_depth)
        return [rng.choice(by_depth[rng.choice(depths)]) for _ in range(n)]


def make_policy(name: str, entropy_statistic: str = "max") -> ExpansionPolicy:
    """The policy named by `sampling.expansion_policy`."""
    if name == "random":
        return RandomPolicy()
    if name == "entropy":
        return EntropyPolicy(entropy_statistic)
    if name == "depth":
        return DepthStratifiedPolicy()
    raise ValueError(f"unknown expansion policy {name!r}; choose random, entropy or depth")
