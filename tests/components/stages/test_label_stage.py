"""components.stages.label on hand-made inputs: advantages, preferences.parquet, granularity.json, trees.html."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from arborl.components.artifacts import manifests, schemas, storage
from arborl.components.config import Config
from arborl.components.stages import label


def node(pid, tid, nid, parent, depth, leaf, text):
    return {"prompt_id": pid, "tree_id": tid, "node_id": nid, "parent_id": parent, "depth": depth,
            "expansion_round": 0, "token_ids": [1], "loss_mask": [True], "logprobs": [-1.0], "text": text,
            "action": "answer" if leaf else "search", "is_leaf": leaf, "finish_reason": "answer" if leaf else None,
            "policy_version": 0}


# a: tree 0 = s → {right (1.0), wrong (0.0)}, tree 1 = one chain that answers wrong (0.2).  b: one leaf (1.0).
NODES = [
    node("a", 0, 0, None, 1, False, "<search> x </search> <information> d </information>"),
    node("a", 0, 1, 0, 2, True, "<answer> right </answer>"),
    node("a", 0, 2, 0, 2, True, "<answer> wrong </answer>"),
    node("a", 1, 0, None, 1, True, "<answer> guess </answer>"),
    node("b", 0, 0, None, 1, True, "<answer> yes </answer>"),
]
REWARDS = [
    {"prompt_id": p, "tree_id": t, "leaf_id": n, "reward": r, "correct": r == 1.0, "f1": r, "verifier": "test",
     "details": "{}", "error": None}
    for p, t, n, r in [("a", 0, 1, 1.0), ("a", 0, 2, 0.0), ("a", 1, 0, 0.2), ("b", 0, 0, 1.0)]
]
PROMPTS = [
    {"prompt_id": p, "data_source": "test", "prompt": f"<question> {p} ? </question>",
     "messages": json.dumps([{"role": "user", "content": f"<question> {p} ? </question>"}]), "ability": "test",
     "reward_model": json.dumps({"style": "rule", "ground_truth": {"target": ["x"]}}), "ground_truth": ["x"],
     "split": "train", "extra_info": "{}"}
    for p in ("a", "b")
]


def artifact(root: Path, name: str, rows: list[dict], schema) -> str:
    out = str(root / name)
    schemas.write(rows, schema, storage.join(out, f"{schema.metadata[b'arborl.schema'].decode()}.parquet"))
    manifests.write_manifest(out, stage=name, inputs={}, config_hash="x", outputs={}, metrics={}, started=time.time())
    return out


@pytest.fixture
def inputs(tmp_path):
    return {"nodes": artifact(tmp_path, "sample", NODES, schemas.NODES),
            "rewards": artifact(tmp_path, "verify", REWARDS, schemas.REWARDS),
            "world": artifact(tmp_path, "prepare", PROMPTS, schemas.PROMPTS)}


def test_label_writes_preferences_report_and_viewer(inputs, tmp_path):
    cfg = Config.model_validate({"advantage": {"preference_margin": 0.1}})
    res = label.run(cfg, inputs, str(tmp_path / "label"))
    assert set(res.outputs) == {"advantages", "preferences", "granularity", "trees"}

    pairs = schemas.read(res.outputs["preferences"], schemas.PREFERENCES).to_pylist()
    got = [(p["depth"], p["prompt"], p["chosen"], p["rejected"], round(p["value_gap"], 4)) for p in pairs]
    assert got == [
        (1, "<question> a ? </question>",
         "<search> x </search> <information> d </information> <answer> right </answer>",
         "<answer> guess </answer>", 0.3),  # V(a/0/0) = 0.5 vs V(a/1/0) = 0.2; chosen follows the best leaf
        (2, "<question> a ? </question> <search> x </search> <information> d </information>",
         "<answer> right </answer>", "<answer> wrong </answer>", 1.0),
    ]
    report = storage.read_json(res.outputs["granularity"])
    assert [(r["depth"], r["branch_points"], r["informative_sets"], r["preference_pairs"]) for r in report] == [
        (1, 1, 1, 1), (2, 1, 1, 1)]
    assert res.metrics["preference_pairs"] == 2
    assert res.metrics["depth1_branch_points"] == 1 and res.metrics["depth2_mean_abs_dv"] == pytest.approx(1.0)
    # |(A⁺ + A⁻) / multiplicity| from the advantages the stage wrote, averaged over the depth's nodes
    adv = schemas.read(res.outputs["advantages"], schemas.ADVANTAGES).to_pylist()
    depth2 = [abs((a["adv_pos"] + a["adv_neg"]) / a["multiplicity"]) for a in adv if a["node_id"] in (1, 2)
              and (a["prompt_id"], a["tree_id"]) == ("a", 0)]
    assert report[1]["mean_abs_advantage"] == pytest.approx(sum(depth2) / 2)

    page = Path(res.outputs["trees"]).read_text()
    assert page.startswith("<!DOCTYPE html>") and '"total_prompts": 2' in page


def test_label_without_preferences_or_viewer(inputs, tmp_path):
    cfg = Config.model_validate({"advantage": {"export_preferences": False}, "viewer": {"max_prompts": 0}})
    res = label.run(cfg, inputs, str(tmp_path / "label"))
    assert set(res.outputs) == {"advantages", "granularity"}
    assert not (tmp_path / "label" / "preferences.parquet").exists()
    assert not (tmp_path / "label" / "trees.html").exists()


def test_label_with_the_per_node_process_estimator(inputs, tmp_path):
    """process: one row per node with its own advantage as A⁺/A⁻ and multiplicity 1; no leaf advantages.
    Tree a/0: V(root) = V(n0) = 0.5, so A(n0) = 0, A(n1) = (0.5 + 0.5)/1 = 1, A(n2) = −1."""
    cfg = Config.model_validate({"advantage": {"estimator": "process"}, "viewer": {"max_prompts": 0}})
    label.run(cfg, inputs, str(tmp_path / "label"))
    rows = schemas.read(str(tmp_path / "label" / "advantages.parquet"), schemas.ADVANTAGES).to_pylist()
    got = {(r["prompt_id"], r["tree_id"], r["node_id"]): (r["adv_pos"], r["adv_neg"], r["multiplicity"])
           for r in rows}
    assert got == {("a", 0, 0): (0.0, 0.0, 1), ("a", 0, 1): (1.0, 0.0, 1), ("a", 0, 2): (0.0, -1.0, 1),
                   ("a", 1, 0): (0.0, 0.0, 1), ("b", 0, 0): (0.0, 0.0, 1)}
    assert all(r["leaf_advantage"] is None and r["estimator"] == "process" for r in rows)


@pytest.mark.parametrize("estimator", ["tree", "process"])
def test_label_metrics_measure_the_signal(inputs, tmp_path, estimator):
    """Zero-spread groups, informative sibling sets and tokens with non-zero advantage in the manifest's metrics.
    Prompt a spreads (1.0, 0.0, 0.2), b has one leaf; tree a/0 spreads, a/1 and b/0 have one leaf each."""
    cfg = Config.model_validate({"advantage": {"estimator": estimator}, "viewer": {"max_prompts": 0}})
    res = label.run(cfg, inputs, str(tmp_path / "label"))
    m = manifests.read_manifest(str(tmp_path / "label"))["metrics"]
    assert m == res.metrics
    assert (m["prompt_groups"], m["zero_spread_prompts"], m["zero_spread_prompt_frac"]) == (2, 1, 0.5)
    assert (m["tree_groups"], m["zero_spread_trees"]) == (3, 2)
    # a's first steps (V 0.5 and 0.2) and a/0/0's children (1.0 and 0.0) differ; b has no sibling set
    assert (m["branch_points"], m["informative_sets"], m["informative_set_frac"]) == (2, 2, 1.0)
    assert m["depth1_informative_set_frac"] == m["depth2_informative_set_frac"] == 1.0
    if estimator == "tree":  # every trajectory of a has an advantage; b's has none: 5 of 6 trajectory tokens
        assert (m["trainable_tokens"], m["nonzero_adv_tokens"], m["nonzero_adv_unique_token_frac"]) == (6, 5, 0.8)
    else:  # per node: only a/0/1 and a/0/2 (±1) of the 5 nodes
        assert (m["trainable_tokens"], m["nonzero_adv_tokens"], m["nonzero_adv_token_frac"]) == (5, 2, 0.4)


def _cut(row: dict) -> dict:
    return {**row, "finish_reason": "budget", "action": "search", "text": "<search> half"}


def test_pool_cut_trajectories_join_no_group_and_no_loss(tmp_path):
    """Under the opt-in exact token pool, a trajectory cut because its prompt's pool ran out (finish reason
    `budget`) is left out of every group statistic and of the loss: the advantages equal those of the same trees
    with the cut leaves (and the nodes only they pass through) removed by hand, and those nodes weigh nothing."""
    from arborl.components.training.packing import build_units

    # c: tree 0 = s → {right (1.0), cut}; tree 1 = s' → cut (s' is on no other path); tree 2 = a wrong answer (0.2)
    kept = [node("c", 0, 0, None, 1, False, "<search> x </search>"),
            node("c", 0, 1, 0, 2, True, "<answer> r </answer>"), node("c", 2, 0, None, 1, True, "<answer> w </answer>")]
    cut = [_cut(node("c", 0, 2, 0, 2, True, "")), node("c", 1, 0, None, 1, False, "<search> y </search>"),
           _cut(node("c", 1, 1, 0, 2, True, ""))]
    reward = lambda t, n, r: {"prompt_id": "c", "tree_id": t, "leaf_id": n, "reward": r, "correct": r == 1.0,  # noqa: E731
                              "f1": r, "verifier": "test", "details": "{}", "error": None}
    kept_rewards = [reward(0, 1, 1.0), reward(2, 0, 0.2)]
    prompts = [dict(PROMPTS[0], prompt_id="c")]
    cfg = Config.model_validate({"advantage": {"estimator": "tree"}})
    runs = {}
    for name, nodes, rewards in (("all", kept + cut, kept_rewards + [reward(0, 2, 0.0), reward(1, 1, 0.0)]),
                                 ("reference", kept, kept_rewards)):
        root = tmp_path / name
        inputs = {"nodes": artifact(root, "sample", nodes, schemas.NODES),
                  "rewards": artifact(root, "verify", rewards, schemas.REWARDS),
                  "world": artifact(root, "prepare", prompts, schemas.PROMPTS)}
        res = label.run(cfg, inputs, str(root / "label"))
        runs[name] = (res, {(a["tree_id"], a["node_id"]): a for a in
                            schemas.read(res.outputs["advantages"], schemas.ADVANTAGES).to_pylist()})
    (res, got), (ref_res, ref) = runs["all"], runs["reference"]
    assert res.metrics["pool_cut_excluded"] == 2 and ref_res.metrics["pool_cut_excluded"] == 0
    assert res.metrics["leaves"] == 2
    for key, row in ref.items():
        for col in ("adv_pos", "adv_neg", "multiplicity", "leaf_advantage"):
            assert got[key][col] == pytest.approx(row[col]), (key, col)
    assert ref[(0, 1)]["leaf_advantage"] > 0 > ref[(2, 0)]["leaf_advantage"]  # A_inter still ranks right over wrong
    for key in ((0, 2), (1, 0), (1, 1)):  # only pool-cut trajectories pass through them: in no loss term
        assert got[key]["multiplicity"] == 0 and got[key]["leaf_advantage"] is None
    leaf_adv = {("c", t, n): a["leaf_advantage"] for (t, n), a in got.items() if a["leaf_advantage"] is not None}
    units = build_units({"c": [5, 6]}, kept + cut, leaf_adv)
    assert [(u.key, u.leaf_ids) for u in units] == [(("c", 0), [1]), (("c", 2), [0])]  # tree 1 trains nothing
