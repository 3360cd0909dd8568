"""How much learning signal one iteration's groups and trees carry (docs/design.md, Advantages): where Tree-GRPO's
extra comparisons come from, measured per iteration by the label stage.

* **Zero-spread groups** — a group whose leaf rewards are all equal (or that has one leaf) gives every leaf
  advantage 0 under group normalisation. Counted over prompt groups (all leaves of a prompt: GRPO, A_inter) and
  over tree groups (the leaves of one tree: A_intra; a chain is a tree with one leaf).
* **Informative sibling sets** — sibling sets (the children of one branch point, the prompt included; see
  `preferences`) whose subtree values V are not all equal, in total and by depth of the compared steps.
* **Trainable tokens with non-zero advantage** — over the trainable (loss-masked) tokens of every trajectory, a
  node's tokens counted once per leaf below it as the duplicated form trains them: the share whose trajectory's
  advantage is not zero (`nonzero_adv_token_frac`); and over each node's tokens once, as the packed form holds
  them: the share under at least one non-zero advantage (`nonzero_adv_unique_token_frac`). A per-node estimator
  gives each node's tokens its own advantage, once.

Every count is returned beside its fraction, so iterations and seeds pool by summing.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping

from arborl.components.advantages.preferences import TIE
from arborl.components.sampling.forest import Forest, NodeKey

ZERO = 1e-9  # advantages below this in size are zero (a group with no spread gives exactly 0)


def _frac(part: float, whole: float) -> float:
    return part / whole if whole else 0.0


def zero_spread_groups(rewards: Mapping[NodeKey, float]) -> dict[str, float]:
    """Prompt and tree groups of the rewarded leaves (prompt_id, tree_id, leaf_id) and those with zero spread."""
    out: dict[str, float] = {}
    for name, width in (("prompt", 1), ("tree", 2)):
        groups: dict[tuple, list[float]] = defaultdict(list)
        for key, reward in rewards.items():
            groups[key[:width]].append(reward)
        flat = sum(1 for v in groups.values() if max(v) - min(v) <= TIE)
        out[f"{name}_groups"] = len(groups)
        out[f"zero_spread_{name}s"] = flat
        out[f"zero_spread_{name}_frac"] = _frac(flat, len(groups))
    return out


def informative_sibling_sets(forest: Forest) -> dict[str, float]:
    """Sibling sets and the informative ones (values not all equal), in total and per depth d of the compared steps:
    `branch_points`, `informative_sets`, `informative_set_frac` and `depth<d>_informative_set_frac`."""
    sets: dict[int, int] = defaultdict(int)
    informative: dict[int, int] = defaultdict(int)
    for _, _, siblings in forest.sibling_sets():
        depth = forest.nodes[siblings[0]]["depth"]
        values = [forest.values[s] for s in siblings]
        sets[depth] += 1
        informative[depth] += int(max(values) - min(values) > TIE)
    out: dict[str, float] = {"branch_points": sum(sets.values()), "informative_sets": sum(informative.values())}
    out["informative_set_frac"] = _frac(out["informative_sets"], out["branch_points"])
    for depth in sorted(sets):
        out[f"depth{depth}_informative_set_frac"] = _frac(informative[depth], sets[depth])
    return out


def nonzero_advantage_tokens(
    trainable: Mapping[NodeKey, int], parents: Mapping[NodeKey, int | None], advantages: Mapping[NodeKey, float],
    per_node: bool,
) -> dict[str, float]:
    """Trainable tokens and those with a non-zero advantage (see the module docstring).

    `trainable`: trainable tokens per node; `parents`: each node's parent node_id (None for a first step);
    `advantages`: per rewarded leaf (`per_node` False) or per node (`per_node` True).
    """
    if per_node:
        total = sum(trainable.values())
        hit = sum(n for key, n in trainable.items() if abs(advantages.get(key, 0.0)) > ZERO)
        return {"trainable_tokens": total, "nonzero_adv_tokens": hit, "nonzero_adv_token_frac": _frac(hit, total),
                "nonzero_adv_unique_token_frac": _frac(hit, total)}
    total = hit = 0
    signalled: set[NodeKey] = set()
    for leaf, adv in advantages.items():
        path: list[NodeKey] = []
        node: int | None = leaf[2]
        while node is not None:
            key = (leaf[0], leaf[1], node)
            path.append(key)
            node = parents[key]
        tokens = sum(trainable[k] for k in path)
        total += tokens
        if abs(adv) > ZERO:
            hit += tokens
            signalled.update(path)
    unique = sum(trainable.values())
    unique_hit = sum(trainable[k] for k in signalled)
    return {"trainable_tokens": total, "nonzero_adv_tokens": hit, "nonzero_adv_token_frac": _frac(hit, total),
            "nonzero_adv_unique_token_frac": _frac(unique_hit, unique)}


def signal_metrics(
    forest: Forest, rewards: Mapping[NodeKey, float], trainable: Mapping[NodeKey, int],
    parents: Mapping[NodeKey, int | None], advantages: Mapping[NodeKey, float], per_node: bool,
) -> dict[str, float]:
    """All of the above, as one flat dict of label-stage metrics."""
    return {**zero_spread_groups(rewards), **informative_sibling_sets(forest),
            **nonzero_advantage_tokens(trainable, parents, advantages, per_node)}


# the counts that pool over iterations and seeds, and the fraction each pair gives
POOLED = {
    "zero_spread_prompt_frac": ("zero_spread_prompts", "prompt_groups"),
    "zero_spread_tree_frac": ("zero_spread_trees", "tree_groups"),
    "informative_set_frac": ("informative_sets", "branch_points"),
    "nonzero_adv_token_frac": ("nonzero_adv_tokens", "trainable_tokens"),
}


def pool(metrics: list[Mapping[str, float]]) -> dict[str, float]:
    """Label-stage metrics of many iterations (and seeds) pooled: the counts summed, each fraction of `POOLED`
    recomputed from them, and `depth<d>_informative_set_frac` from the summed `depth<d>_informative_sets` and
    `depth<d>_branch_points` (the granularity report's per-depth counts)."""
    sums: dict[str, float] = defaultdict(float)
    for m in metrics:
        for key, value in m.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool) and not key.endswith("_frac"):
                sums[key] += value
    out: dict[str, float] = {}
    for frac, (part, whole) in POOLED.items():
        out[part], out[whole] = sums[part], sums[whole]
        out[frac] = _frac(sums[part], sums[whole])
    depths = sorted(int(k[len("depth"):-len("_branch_points")]) for k in sums
                    if k.startswith("depth") and k.endswith("_branch_points"))
    for d in depths:
        sets, informative = sums[f"depth{d}_branch_points"], sums[f"depth{d}_informative_sets"]
        out[f"depth{d}_informative_set_frac"] = _frac(informative, sets)
    return out
