"""verify: outcome rewards for every leaf (the reward `verify.reward` gives its prompt's data source) →
rewards.parquet."""

from __future__ import annotations

import json
import re
from collections import Counter
from functools import partial
from typing import Any

from arborl.components.artifacts import schemas, storage
from arborl.components.config import Config
from arborl.components.sampling.forest import Forest, leaf_key
from arborl.components.stages.base import run_stage
from arborl.components.stages.contract import StageResult, VerifyInputs
from arborl.components.verification.calls import sample_from_prompt
from arborl.components.verification.scoring import RewardErrors, check_reward_errors, score_samples

__all__ = ["RewardErrors", "leaf_responses", "run", "verify_leaves"]


def leaf_responses(forest: Forest) -> list[tuple[str, int, int, str]]:
    """(prompt_id, tree_id, leaf_id, response text along the root→leaf path) for every leaf, in row order."""
    return [(*key, forest.response(key)) for key in forest.leaves()]


def _metric_name(verifier: str) -> str:
    """A verifier's name or import path as a metric-name part (MLflow: letters, digits, _ - . : / and space)."""
    return re.sub(r"[^\w.:-]", "_", verifier)


def verify_leaves(cfg: Config, inputs: dict[str, str], out: str) -> tuple[dict[str, str], dict[str, Any]]:
    """Score every leaf's root→leaf response with its prompt's reward → rewards.parquet."""
    given = VerifyInputs.from_uris(inputs)
    forest = Forest.read(given.nodes)
    prompts = {p["prompt_id"]: p for p in schemas.read_prompts(given.world)}
    leaves = leaf_responses(forest)
    samples = []
    for pid, tid, leaf, response in leaves:
        if pid not in prompts:
            raise KeyError(
                f"{given.nodes}/{schemas.NODES_FILE}: prompt_id {pid!r} (tree {tid}, leaf {leaf}) "
                "has no ground truth"
            )
        samples.append(sample_from_prompt(prompts[pid], response))
    rows = []
    for (pid, tid, leaf, _), o in zip(leaves, score_samples(samples, cfg.verify), strict=True):
        row = {"reward": o.reward, "correct": o.correct, "f1": o.f1, "error": o.error,
               "details": json.dumps(o.details, default=str)}
        rows.append({"prompt_id": pid, "tree_id": tid, "leaf_id": leaf, "verifier": o.verifier, **row})
    check_reward_errors([(leaf_key(r), r["verifier"], r["error"]) for r in rows],
                        cfg.verify.max_error_fraction, f"verify ({given.nodes})")
    uri = storage.join(out, schemas.REWARDS_FILE)
    schemas.write(rows, schemas.REWARDS, uri)
    n = max(len(rows), 1)
    per_leaves = Counter(r["verifier"] for r in rows)
    per_errors = Counter(r["verifier"] for r in rows if r["error"] is not None)
    return {"rewards": uri}, {
        "leaves": len(rows),
        "reward_mean": sum(r["reward"] for r in rows) / n,
        "correct_mean": sum(r["correct"] for r in rows) / n,
        "errors": sum(r["error"] is not None for r in rows),
        "error_fraction": sum(r["error"] is not None for r in rows) / n,
        **{f"leaves/{_metric_name(v)}": c for v, c in sorted(per_leaves.items())},
        **{f"errors/{_metric_name(v)}": per_errors[v] for v in sorted(per_leaves)},
    }


def run(cfg: Config, inputs: dict[str, str], out: str) -> StageResult:
    return run_stage("verify", cfg, inputs, out, ("verify",), partial(verify_leaves, cfg, inputs, out))
