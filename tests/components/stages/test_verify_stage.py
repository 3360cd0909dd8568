"""components.stages.verify on hand-made nodes.parquet and prompts.parquet: the reward per data source, TRL
batching over all leaves, verl ground truths from reward_model, per-leaf errors and per-verifier metrics."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from arborl.components.artifacts import manifests, schemas, storage
from arborl.components.config import Config
from arborl.components.stages import verify

FNS = Path(__file__).resolve().parents[1] / "verification"  # user_reward_fns.py, imported by path


def node(pid, tid, nid, parent, leaf, text):
    return {"prompt_id": pid, "tree_id": tid, "node_id": nid, "parent_id": parent, "depth": 1, "expansion_round": 0,
            "token_ids": [1], "loss_mask": [True], "logprobs": [-1.0], "text": text,
            "action": "answer" if leaf else "search", "is_leaf": leaf, "finish_reason": "answer" if leaf else None,
            "policy_version": 0}


SEARCH = "<search> q </search> <information> d </information>"
# a (nq): one search, then right / wrong.  b (nq): one leaf.  m (gsm8k): a boxed answer, an <answer> block.
NODES = [
    node("a", 0, 0, None, False, SEARCH),
    node("a", 0, 1, 0, True, "<answer> paris </answer>"),
    node("a", 0, 2, 0, True, "<answer> rome </answer>"),
    node("b", 0, 0, None, True, "<answer> the lyon </answer>"),
    node("m", 0, 0, None, True, "so \\boxed{\\frac{1}{2}}"),
    node("m", 1, 0, None, True, "<answer> 0.4 </answer>"),
]


def prompt(pid: str, source: str, golds: list[str], reward_model: dict | None = None) -> dict:
    """A prompts row with every column of the current schema (the v2 columns where it has them)."""
    row = {"prompt_id": pid, "data_source": source, "prompt": f"<question> {pid} </question>",
           "ground_truth": golds, "split": "train", "extra_info": json.dumps({"hops": 1})}
    extra = {"messages": json.dumps([{"role": "user", "content": row["prompt"]}]), "ability": "qa",
             "reward_model": json.dumps(reward_model or {"style": "rule", "ground_truth": {"target": golds}})}
    return {**row, **{k: v for k, v in extra.items() if k in schemas.PROMPTS.names}}


PROMPTS = [prompt("a", "nq", ["paris"]), prompt("b", "nq", ["lyon"]), prompt("m", "gsm8k", ["0.5"])]


def artifact(root: Path, name: str, rows: list[dict], schema) -> str:
    out = str(root / name)
    schemas.write(rows, schema, storage.join(out, f"{schema.metadata[b'arborl.schema'].decode()}.parquet"))
    manifests.write_manifest(out, stage=name, inputs={}, config_hash="x", outputs={}, metrics={}, started=time.time())
    return out


def run_verify(tmp_path: Path, verify_cfg: dict, prompts: list[dict] = PROMPTS) -> tuple[list[dict], dict]:
    inputs = {"nodes": artifact(tmp_path, "sample", NODES, schemas.NODES),
              "world": artifact(tmp_path, "prepare", prompts, schemas.PROMPTS)}
    res = verify.run(Config.model_validate({"verify": verify_cfg}), inputs, str(tmp_path / "verify"))
    rows = schemas.read(res.outputs["rewards"], schemas.REWARDS).to_pylist()
    return {(r["prompt_id"], r["tree_id"], r["leaf_id"]): r for r in rows}, res.metrics


@pytest.fixture
def fns(monkeypatch):
    monkeypatch.syspath_prepend(str(FNS))
    import user_reward_fns

    user_reward_fns.CALLS.clear()
    return user_reward_fns


def test_default_config_scores_every_leaf_with_qa_em_format(tmp_path):
    rows, metrics = run_verify(tmp_path, {})
    assert {k: r["reward"] for k, r in rows.items()} == pytest.approx(
        {("a", 0, 1): 1.0, ("a", 0, 2): 0.2, ("b", 0, 0): 1.0, ("m", 0, 0): 0.0, ("m", 1, 0): 0.2})
    assert {r["verifier"] for r in rows.values()} == {"qa_em_format"}
    assert json.loads(rows["a", 0, 1]["details"]) == {"answer": "paris", "valid_format": True, "format": "ok"}
    assert metrics["leaves"] == 5 and metrics["errors"] == 0
    assert metrics["leaves/qa_em_format"] == 5 and metrics["errors/qa_em_format"] == 0


def test_rewards_per_data_source_with_user_callables(tmp_path, fns):
    rows, metrics = run_verify(tmp_path, {"reward": {"default": "qa_em_format", "nq": "user_reward_fns:trl_contains",
                                                     "gsm8k": "math"}})
    assert len(fns.CALLS) == 1 and len(fns.CALLS[0][1]["completions"]) == 3  # one batch: every nq leaf
    assert fns.CALLS[0][1]["completions"][0] == f"{SEARCH} <answer> paris </answer>"  # the root→leaf text
    nq = {k: (r["reward"], r["correct"], r["verifier"]) for k, r in rows.items() if k[0] != "m"}
    trl = "user_reward_fns:trl_contains"
    assert nq == {("a", 0, 1): (1.0, True, trl), ("a", 0, 2): (0.0, False, trl), ("b", 0, 0): (1.0, True, trl)}
    assert rows["m", 0, 0]["reward"] == 1.0 and rows["m", 0, 0]["verifier"] == "math"
    assert json.loads(rows["m", 0, 0]["details"])["answer_from"] == "boxed"
    assert rows["m", 1, 0]["reward"] == 0.0 and not rows["m", 1, 0]["correct"]
    assert metrics[f"leaves/{trl}"] == 3 and metrics["leaves/math"] == 2 and metrics["errors/math"] == 0
    assert metrics["correct_mean"] == pytest.approx(3 / 5)


def test_verl_gets_reward_model_ground_truth(tmp_path, fns):
    prompts = [prompt("a", "nq", ["paris"], {"style": "rule", "ground_truth": {"target": ["rome"]}}),
               *PROMPTS[1:]]
    rows, _ = run_verify(tmp_path, {"reward": {"default": "user_reward_fns:verl_contains"}}, prompts)
    if "reward_model" in schemas.PROMPTS.names:
        assert rows["a", 0, 2]["reward"] == 1.0 and rows["a", 0, 1]["reward"] == 0.0  # the target is "rome"
    else:  # prompts without reward_model: {"target": ground_truth}
        assert rows["a", 0, 1]["reward"] == 1.0
    assert rows["b", 0, 0]["reward"] == 1.0


def test_failing_callables_cost_their_leaves_not_the_stage(tmp_path, fns):
    rows, metrics = run_verify(tmp_path, {"reward": {"default": "qa_em_format", "nq": "user_reward_fns:verl_hangs",
                                                     "gsm8k": "user_reward_fns:trl_wrong_length"},
                                          "timeout_s": 0.2, "max_error_fraction": 1.0})
    hang = "CallTimeout: user_reward_fns:verl_hangs did not return within 0.2 s (verify.timeout_s)"
    assert [r["error"] for k, r in sorted(rows.items()) if k[0] != "m"] == [hang] * 3
    assert all(r["reward"] == 0.0 and r["details"] == "{}" for r in rows.values())
    assert rows["m", 0, 0]["error"] == ("ValueError: user_reward_fns:trl_wrong_length returned 1 rewards for "
                                        "2 completions")
    assert metrics["errors"] == 5 and metrics["errors/user_reward_fns:verl_hangs"] == 3
    assert metrics["errors/user_reward_fns:trl_wrong_length"] == 2


@pytest.mark.parametrize("fn, first", [
    ("verl_raises", "RuntimeError: boom in the reward"),
    ("verl_none", "NoneType ('None'), not a number"),
    ("verl_string", "'high'"),
    ("verl_inf", "inf"),
])
def test_a_reward_that_fails_fails_the_stage_naming_it(tmp_path, fns, fn, first):
    """Above verify.max_error_fraction the stage fails — never a run trained on zeros — naming the callable, the
    count and the first error with its row; nothing is written."""
    spec = f"user_reward_fns:{fn}"
    with pytest.raises(verify.RewardErrors) as err:
        run_verify(tmp_path, {"reward": {"default": spec}})
    text = str(err.value)
    assert f"5 of 5 reward calls failed ({spec})" in text and "first, row ('a', 0, 1)" in text and first in text
    assert "verify.max_error_fraction=0.01" in text
    assert not (tmp_path / "verify" / "_manifest.json").exists()


def test_reward_errors_within_the_budget_warn_once_and_are_counted(tmp_path, fns, caplog):
    # gsm8k's two leaves fail (2 of 5), allowed by a budget of 0.5
    rows, metrics = run_verify(tmp_path, {"reward": {"default": "qa_em_format", "gsm8k": "user_reward_fns:verl_raises"},
                                          "max_error_fraction": 0.5})
    assert metrics["errors"] == 2 and metrics["error_fraction"] == pytest.approx(0.4)
    warnings = [r for r in caplog.records if "reward calls failed" in r.getMessage()]
    assert len(warnings) == 1 and "2 of 5" in warnings[0].getMessage()


def test_search_r1_rewards_port_unchanged_with_the_prompt_in_solution_str(tmp_path, fns):
    """Search-R1's compute_score_em takes (solution_str, ground_truth, ...) without data_source and expects the
    prompt before the response (its instructions show one example <answer>). With verify.reward_input
    prompt_and_response it scores as in Search-R1; with the response alone the single answer is not read."""
    example = "Answer inside <answer> and </answer>, e.g. <answer> Beijing </answer>. "
    prompts = [dict(p, prompt=example + p["prompt"]) for p in PROMPTS]
    spec = {"default": "user_reward_fns:search_r1_style_em"}
    rows, _ = run_verify(tmp_path / "full", {"reward": spec, "reward_input": "prompt_and_response"}, prompts)
    assert rows["a", 0, 1]["reward"] == 1.0 and rows["a", 0, 2]["reward"] == 0.0 and rows["b", 0, 0]["reward"] == 0.0
    rows, _ = run_verify(tmp_path / "alone", {"reward": spec, "max_error_fraction": 1.0}, prompts)
    assert rows["a", 0, 1]["reward"] == 0.0  # one <answer> in the response alone: Search-R1's function skips it
