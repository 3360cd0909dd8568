"""Outcome-reward advantage math (docs/design.md, Advantages) and the per-node token weights.

`norm(R, G) = (R − mean_G) / (std_G + eps)` with the unbiased std; a group of size 1 or with zero
spread gives 0. Per-leaf advantages act on every trainable token of the leaf's path, so a node on the
paths of k leaves carries A⁺ = Σ positive and A⁻ = Σ negative advantages of those leaves and
multiplicity k — exactly what duplicating the k trajectories does.

The named estimators built from these functions, and what each needs from training, are in
`arborl.components.advantages.registry`.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping
from typing import Literal

import numpy as np

LeafKey = tuple[str, int, int]  # (prompt_id, tree_id, leaf node_id)
NodeKey = tuple[str, int, int]  # (prompt_id, tree_id, node_id)


def group_norm(rewards: np.ndarray, eps: float = 1e-6, scale: bool = True) -> np.ndarray:
    """Normalise rewards within one group; size-1 or zero-spread groups give zeros."""
    rewards = np.asarray(rewards, dtype=np.float64)
    if rewards.size < 2 or np.ptp(rewards) == 0:
        return np.zeros_like(rewards)
    centred = rewards - rewards.mean()
    return centred / (rewards.std(ddof=1) + eps) if scale else centred


def grouped_advantages(
    rewards: Mapping[LeafKey, float], by: Literal["prompt", "tree"], eps: float = 1e-6, scale: bool = True
) -> dict[LeafKey, float]:
    """`group_norm` of every leaf's reward within its group: all leaves of the prompt (`by="prompt"`: GRPO,
    Tree-GRPO's A_inter) or the leaves of its tree (`by="tree"`: A_intra). `scale=False` only centres."""
    if by not in ("prompt", "tree"):
        raise ValueError(f"group leaves by 'prompt' or 'tree', not {by!r}")
    width = 1 if by == "prompt" else 2
    groups: dict[tuple, list[LeafKey]] = defaultdict(list)
    for key in rewards:
        groups[key[:width]].append(key)
    out = {}
    for keys in groups.values():
        for key, a in zip(keys, group_norm([rewards[k] for k in keys], eps, scale), strict=True):
            out[key] = float(a)
    return out


def node_weights(
    parents: Mapping[NodeKey, int | None], leaf_adv: Mapping[LeafKey, float]
) -> dict[NodeKey, tuple[float, float, int]]:
    """(A⁺, A⁻, multiplicity) per node, summing the advantages of the leaves below it.

    `parents` maps every node (prompt_id, tree_id, node_id) to its parent node_id (None for a first step).
    """
    out: dict[NodeKey, list] = {k: [0.0, 0.0, 0] for k in parents}
    for leaf, adv in leaf_adv.items():
        if leaf not in parents:
            raise KeyError(f"leaf {leaf} has a reward but no node")
        node: int | None = leaf[2]
        while node is not None:
            key = (leaf[0], leaf[1], node)
            w = out[key]
            if adv > 0:
                w[0] += adv
            elif adv < 0:
                w[1] += adv
            w[2] += 1
            node = parents[key]
    return {k: (v[0], v[1], v[2]) for k, v in out.items()}


def process_advantages(
    parents: Mapping[NodeKey, int | None], rewards: Mapping[LeafKey, float]
) -> dict[NodeKey, float]:
    """TreeRL-style process advantage per node (docs/design.md, Advantages), not per trajectory:

        A(n) = ((V(n) − V(root)) + (V(n) − V(parent))) / sqrt(L(n))

    with V(n) the mean reward of the L(n) leaves under n, and root the tree's prompt (V = mean over the
    tree's leaves; the parent of a first step). Every node of a tree with a rewarded leaf gets a value.
    """
    total: dict[NodeKey, float] = defaultdict(float)
    count: dict[NodeKey, int] = defaultdict(int)
    tree_total: dict[tuple[str, int], float] = defaultdict(float)
    tree_count: dict[tuple[str, int], int] = defaultdict(int)
    for leaf, reward in rewards.items():
        if leaf not in parents:
            raise KeyError(f"leaf {leaf} has a reward but no node")
        tree_total[leaf[:2]] += reward
        tree_count[leaf[:2]] += 1
        node: int | None = leaf[2]
        while node is not None:
            key = (leaf[0], leaf[1], node)
            total[key] += reward
            count[key] += 1
            node = parents[key]
    out = {}
    for key, n in count.items():
        v = total[key] / n
        v_root = tree_total[key[:2]] / tree_count[key[:2]]
        parent = parents[key]
        v_parent = v_root if parent is None else total[(key[0], key[1], parent)] / count[(key[0], key[1], parent)]
        out[key] = ((v - v_root) + (v - v_parent)) / n**0.5
    return out
