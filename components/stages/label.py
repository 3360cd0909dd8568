"""label: advantages per leaf (leaves an exact token pool cut are left out) and per-node token weights (A⁺, A⁻,
multiplicity) → advantages.parquet; sibling-subtree preference pairs → preferences.parquet; the per-depth
granularity report → granularity.json; a tree viewer → trees.html. Its metrics include how much signal the
iteration carries (`advantages.signal`): zero-spread groups, informative sibling sets, trainable tokens with non-zero
advantage."""

from __future__ import annotations

from functools import partial
from typing import Any

from arborl.components.advantages.preferences import granularity, node_advantage, preference_pairs
from arborl.components.advantages.registry import label_advantages
from arborl.components.advantages.signal import signal_metrics
from arborl.components.artifacts import schemas, storage
from arborl.components.config import Config
from arborl.components.sampling.forest import Forest, leaf_key
from arborl.components.sampling.mechanism import POOL_CUT
from arborl.components.stages.base import run_stage
from arborl.components.stages.contract import LabelInputs, StageResult
from arborl.components.viewer.tree_html import build_html


def without_pool_cuts(forest: Forest, rewards: list[dict]) -> tuple[Forest, list[dict], int]:
    """(forest, rewards, count) without the leaves an exact token pool cut (finish reason `budget`, only under the
    opt-in `budget.token_stop: exact`) and without the nodes that then have no leaf below them. A pool-cut
    trajectory says nothing about its actions, only that its prompt's pool ran out, so it joins no group statistic
    and no loss term (like DAPO's overlong filter); a tree or prompt group left with one member gets no advantage."""
    cut = {k for k in forest.leaves() if forest.nodes[k]["finish_reason"] == POOL_CUT}
    if not cut:
        return forest, rewards, 0
    alive = {k for leaf in forest.leaves() if leaf not in cut for k in forest.path(leaf)}
    kept_rewards = [r for r in rewards if leaf_key(r) not in cut]
    return Forest.from_rows(n for k, n in forest.nodes.items() if k in alive), kept_rewards, len(cut)


def label_trees(cfg: Config, inputs: dict[str, str], out: str) -> tuple[dict[str, str], dict[str, Any]]:
    """Advantages and token weights of every node from the leaves' rewards, then the granularity report,
    the preference pairs and the tree viewer."""
    given = LabelInputs.from_uris(inputs)
    sampled = Forest.read(given.nodes)
    rewards = schemas.read(storage.join(given.rewards, schemas.REWARDS_FILE), schemas.REWARDS).to_pylist()
    est = cfg.advantage.estimator
    forest, rewards, excluded = without_pool_cuts(sampled, rewards)
    leaf_rewards = {leaf_key(r): r["reward"] for r in rewards}
    parents = forest.parents()
    labels = label_advantages(est, parents, leaf_rewards, cfg.advantage.eps)  # per leaf or per node (registry)
    leaf_adv, signal, weights = labels.leaf_advantages, labels.advantages, labels.weights
    rows = [
        {"prompt_id": k[0], "tree_id": k[1], "node_id": k[2], "adv_pos": w[0], "adv_neg": w[1],
         "multiplicity": w[2], "leaf_advantage": leaf_adv.get(k), "estimator": est}
        for k, w in sorted(weights.items())
    ]
    rows += [  # nodes only pool-cut trajectories pass through: in no loss term
        {"prompt_id": k.prompt_id, "tree_id": k.tree_id, "node_id": k.node_id, "adv_pos": 0.0,
         "adv_neg": 0.0, "multiplicity": 0, "leaf_advantage": None, "estimator": est}
        for k in sampled.nodes if k not in weights
    ]
    uri = storage.join(out, schemas.ADVANTAGES_FILE)
    schemas.write(rows, schemas.ADVANTAGES, uri)
    nonzero = [a for a in signal.values() if a != 0.0]
    metrics = {  # over leaves for per-leaf estimators, over nodes for per-node ones
        "leaves": len(leaf_rewards),
        "pool_cut_excluded": excluded,
        "nonzero_advantage_frac": len(nonzero) / max(len(signal), 1),
        "advantage_abs_mean": sum(abs(a) for a in signal.values()) / max(len(signal), 1),
    }
    outputs = {"advantages": uri}

    forest.with_rewards(rewards)
    trainable = {k: sum(n["loss_mask"]) for k, n in forest.nodes.items()}
    metrics.update(signal_metrics(forest, leaf_rewards, trainable, parents, signal, labels.estimator.per_node))
    margin = cfg.advantage.preference_margin
    report = granularity(forest, margin, {k: node_advantage(*w) for k, w in weights.items()})
    outputs["granularity"] = storage.join(out, schemas.GRANULARITY_FILE)
    storage.write_json(outputs["granularity"], report)
    for r in report:
        for k in ("branch_points", "informative_sets", "mean_abs_dv", "mean_abs_advantage", "preference_pairs"):
            metrics[f"depth{r['depth']}_{k}"] = r[k]
    prompts = {p["prompt_id"]: p["prompt"] for p in schemas.read_prompts(given.world)}
    if cfg.advantage.export_preferences:
        pairs = preference_pairs(forest, prompts, margin)
        outputs["preferences"] = storage.join(out, schemas.PREFERENCES_FILE)
        metrics["preference_pairs"] = schemas.write(pairs, schemas.PREFERENCES, outputs["preferences"])
    if cfg.viewer.max_prompts:
        outputs["trees"] = storage.join(out, schemas.TREES_FILE)
        page = build_html(forest, rewards, rows, prompts, title=f"arborl trees: {out}",
                          max_prompts=cfg.viewer.max_prompts)
        storage.write_bytes(outputs["trees"], page.encode())
    return outputs, metrics


def run(cfg: Config, inputs: dict[str, str], out: str) -> StageResult:
    return run_stage("label", cfg, inputs, out, ("advantage", "viewer"), partial(label_trees, cfg, inputs, out))
