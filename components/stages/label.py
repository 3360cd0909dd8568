"""label: advantages per leaf and per-node token weights (A⁺, A⁻, multiplicity) → advantages.parquet;
sibling-subtree preference pairs → preferences.parquet; the per-depth granularity report → granularity.json;
a tree viewer → trees.html."""

from __future__ import annotations

from arborl.components import schemas, storage
from arborl.components.advantages.estimators import leaf_advantages, node_weights, process_advantages
from arborl.components.advantages.preferences import build_forest, granularity, node_advantage, preference_pairs
from arborl.components.config import Config
from arborl.components.stages.base import StageResult, load_prompts, run_stage
from arborl.components.viewer.tree_html import build_html


def run(cfg: Config, inputs: dict[str, str], out: str) -> StageResult:
    def body():
        nodes = schemas.read(storage.join(inputs["nodes"], "nodes.parquet"), schemas.NODES).to_pylist()
        rewards = schemas.read(storage.join(inputs["rewards"], "rewards.parquet"), schemas.REWARDS).to_pylist()
        est = cfg.advantage.estimator
        leaf_rewards = {(r["prompt_id"], r["tree_id"], r["leaf_id"]): r["reward"] for r in rewards}
        parents = {(n["prompt_id"], n["tree_id"], n["node_id"]): n["parent_id"] for n in nodes}
        if est == "process":  # per node: each node's tokens carry its own advantage once (multiplicity 1)
            leaf_adv = {}
            signal = process_advantages(parents, leaf_rewards)
            weights = {k: (max(a, 0.0), min(a, 0.0), 1) for k, a in signal.items()}
        else:
            leaf_adv = leaf_advantages(leaf_rewards, est, cfg.advantage.eps)
            signal = leaf_adv
            weights = node_weights(parents, leaf_adv)
        rows = [
            {"prompt_id": k[0], "tree_id": k[1], "node_id": k[2], "adv_pos": w[0], "adv_neg": w[1],
             "multiplicity": w[2], "leaf_advantage": leaf_adv.get(k), "estimator": est}
            for k, w in sorted(weights.items())
        ]
        uri = storage.join(out, "advantages.parquet")
        schemas.write(rows, schemas.ADVANTAGES, uri)
        nonzero = [a for a in signal.values() if a != 0.0]
        metrics = {  # over leaves for per-leaf estimators, over nodes for `process`
            "leaves": len(leaf_rewards),
            "nonzero_advantage_frac": len(nonzero) / max(len(signal), 1),
            "advantage_abs_mean": sum(abs(a) for a in signal.values()) / max(len(signal), 1),
        }
        outputs = {"advantages": uri}

        forest = build_forest(nodes, rewards)
        margin = cfg.advantage.preference_margin
        report = granularity(forest, margin, {k: node_advantage(*w) for k, w in weights.items()})
        outputs["granularity"] = storage.join(out, "granularity.json")
        storage.write_json(outputs["granularity"], report)
        for r in report:
            for k in ("branch_points", "informative_sets", "mean_abs_dv", "mean_abs_advantage", "preference_pairs"):
                metrics[f"depth{r['depth']}_{k}"] = r[k]
        prompts = {p["prompt_id"]: p["prompt"] for p in load_prompts(inputs["world"])}
        if cfg.advantage.export_preferences:
            pairs = preference_pairs(forest, prompts, margin)
            outputs["preferences"] = storage.join(out, "preferences.parquet")
            metrics["preference_pairs"] = schemas.write(pairs, schemas.PREFERENCES, outputs["preferences"])
        if cfg.viewer.max_prompts:
            outputs["trees"] = storage.join(out, "trees.html")
            page = build_html(nodes, rewards, rows, prompts, title=f"arborl trees: {out}",
                              max_prompts=cfg.viewer.max_prompts)
            storage.write_bytes(outputs["trees"], page.encode())
        return outputs, metrics

    return run_stage("label", cfg, inputs, out, ("advantage", "viewer"), body)
