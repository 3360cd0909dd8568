"""label: advantages per leaf and per-node token weights (A⁺, A⁻, multiplicity) → advantages.parquet."""

from __future__ import annotations

from components import schemas, storage
from components.advantages.estimators import leaf_advantages, node_weights
from components.config import Config
from components.stages.base import StageResult, run_stage


def run(cfg: Config, inputs: dict[str, str], out: str) -> StageResult:
    def body():
        nodes = schemas.read(storage.join(inputs["nodes"], "nodes.parquet"), schemas.NODES).to_pylist()
        rewards = schemas.read(storage.join(inputs["rewards"], "rewards.parquet"), schemas.REWARDS).to_pylist()
        est = cfg.advantage.estimator
        leaf_adv = leaf_advantages(
            {(r["prompt_id"], r["tree_id"], r["leaf_id"]): r["reward"] for r in rewards}, est, cfg.advantage.eps
        )
        parents = {(n["prompt_id"], n["tree_id"], n["node_id"]): n["parent_id"] for n in nodes}
        weights = node_weights(parents, leaf_adv)
        rows = [
            {"prompt_id": k[0], "tree_id": k[1], "node_id": k[2], "adv_pos": w[0], "adv_neg": w[1],
             "multiplicity": w[2], "leaf_advantage": leaf_adv.get(k), "estimator": est}
            for k, w in sorted(weights.items())
        ]
        uri = storage.join(out, "advantages.parquet")
        schemas.write(rows, schemas.ADVANTAGES, uri)
        nonzero = [a for a in leaf_adv.values() if a != 0.0]
        return {"advantages": uri}, {
            "leaves": len(leaf_adv),
            "nonzero_advantage_frac": len(nonzero) / max(len(leaf_adv), 1),
            "advantage_abs_mean": sum(abs(a) for a in leaf_adv.values()) / max(len(leaf_adv), 1),
        }

    return run_stage("label", cfg, inputs, out, ("advantage",), body)
