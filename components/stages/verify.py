"""verify: outcome rewards for every leaf (Search-R1 EM with format scores) → rewards.parquet."""

from __future__ import annotations

import json
from functools import partial
from typing import Any

from arborl.components import schemas, storage
from arborl.components.config import Config
from arborl.components.stages.base import StageResult, load_prompts, run_stage
from arborl.components.verification.qa_em import VERIFIER, score_response


def leaf_responses(nodes: list[dict]) -> list[tuple[str, int, int, str]]:
    """(prompt_id, tree_id, leaf_id, response text along the root→leaf path) for every leaf."""
    by_key = {(n["prompt_id"], n["tree_id"], n["node_id"]): n for n in nodes}
    out = []
    for n in nodes:
        if not n["is_leaf"]:
            continue
        texts, cur = [], n
        while cur is not None:
            texts.append(cur["text"])
            parent = cur["parent_id"]
            cur = None if parent is None else by_key[(n["prompt_id"], n["tree_id"], parent)]
        out.append((n["prompt_id"], n["tree_id"], n["node_id"], " ".join(reversed(texts))))
    return out


def verify_leaves(cfg: Config, inputs: dict[str, str], out: str) -> tuple[dict[str, str], dict[str, Any]]:
    """Score every leaf's root→leaf response against its question's ground truth → rewards.parquet."""
    nodes = schemas.read(storage.join(inputs["nodes"], schemas.NODES_FILE), schemas.NODES).to_pylist()
    truths = {p["prompt_id"]: list(p["ground_truth"]) for p in load_prompts(inputs["world"])}
    rows = []
    for pid, tid, leaf, response in leaf_responses(nodes):
        if pid not in truths:
            raise KeyError(
                f"{inputs['nodes']}/{schemas.NODES_FILE}: prompt_id {pid!r} (tree {tid}, leaf {leaf}) "
                "has no ground truth"
            )
        try:
            s = score_response(response, truths[pid], cfg.verify)
            row = {"reward": s.reward, "correct": s.correct, "f1": s.f1, "error": None,
                   "details": json.dumps({"answer": s.answer, "valid_format": s.valid_format,
                                          "format": s.format_reason})}
        except Exception as exc:  # a verifier bug costs that leaf its reward, never the stage
            row = {"reward": 0.0, "correct": False, "f1": 0.0, "error": f"{type(exc).__name__}: {exc}",
                   "details": "{}"}
        rows.append({"prompt_id": pid, "tree_id": tid, "leaf_id": leaf, "verifier": VERIFIER, **row})
    uri = storage.join(out, schemas.REWARDS_FILE)
    schemas.write(rows, schemas.REWARDS, uri)
    n = max(len(rows), 1)
    return {"rewards": uri}, {
        "leaves": len(rows),
        "reward_mean": sum(r["reward"] for r in rows) / n,
        "correct_mean": sum(r["correct"] for r in rows) / n,
        "errors": sum(r["error"] is not None for r in rows),
    }


def run(cfg: Config, inputs: dict[str, str], out: str) -> StageResult:
    return run_stage("verify", cfg, inputs, out, ("verify",), partial(verify_leaves, cfg, inputs, out))
