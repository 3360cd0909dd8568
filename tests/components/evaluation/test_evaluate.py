"""components.evaluation.evaluate: rows per question and sample, pass@k from those rows, breakdowns, intervals."""

from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path

import pytest

from arborl.components.config import AgentConfig, VerifyConfig
from arborl.components.evaluation.evaluate import evaluate_policy, question_scores, summarize
from arborl.components.sampling.agent import SearchEnv
from arborl.components.sampling.engine import HFBackend


@pytest.fixture(scope="module")
def evaluated(policy, tokenizer, retriever, questions):
    backend = HFBackend(policy, tokenizer.pad_token_id, tokenizer.eos_token_id)
    env = SearchEnv(retriever, tokenizer)
    prompts = questions["val"][:4] + questions["test"][:8]
    rows, metrics = evaluate_policy(backend, env, prompts, AgentConfig(), VerifyConfig(), temperature=1.0, seed=5,
                                    pass_k=(1, 2, 4), bootstrap=200)
    return prompts, rows, metrics


def test_rows_hold_one_greedy_and_max_k_samples_per_question(evaluated):
    prompts, rows, _ = evaluated
    greedy = [r for r in rows if r["mode"] == "greedy"]
    sampled = [r for r in rows if r["mode"] == "sampled"]
    assert len(greedy) == len(prompts) and len(sampled) == 4 * len(prompts)
    per_q = defaultdict(list)
    for r in sampled:
        per_q[r["prompt_id"]].append(r["sample"])
    assert all(sorted(s) == [0, 1, 2, 3] for s in per_q.values())
    assert all(isinstance(r["valid_format"], bool) and r["generated_tokens"] > 0 for r in rows)


def test_metrics_are_recomputed_from_rows(evaluated):
    prompts, rows, m = evaluated
    test = [r for r in rows if r["split"] == "test"]
    greedy = [r for r in test if r["mode"] == "greedy"]
    assert m["test_em"] == pytest.approx(sum(r["em"] for r in greedy) / 8)
    assert m["test_format_error_rate"] == pytest.approx(sum(not r["valid_format"] for r in greedy) / 8)
    assert m["test_generated_tokens"] == pytest.approx(sum(r["generated_tokens"] for r in greedy) / 8)
    correct = defaultdict(int)
    for r in test:
        if r["mode"] == "sampled":
            correct[r["prompt_id"]] += int(r["em"])
    for k in (1, 2, 4):  # independent reference: the combinatorial formula per question
        want = sum(1 - math.comb(4 - c, k) / math.comb(4, k) for c in correct.values()) / 8
        assert m[f"test_pass_at_{k}"] == pytest.approx(want)
    assert m["test_pass_at_1"] == pytest.approx(m["test_em_sampled"])
    assert m["test_pass_at_1"] <= m["test_pass_at_2"] <= m["test_pass_at_4"]
    for name in ("em", "f1", "em_sampled", "pass_at_4"):
        assert m[f"test_{name}_ci_low"] <= m[f"test_{name}"] <= m[f"test_{name}_ci_high"]
    assert m["test_em_src_synthetic_kb"] == pytest.approx(m["test_em"])
    hops = {r["hops"] for r in greedy}
    assert {f"test_em_hop{h}" for h in hops} <= set(m)
    assert "val_em" in m and "val_pass_at_4" in m


def test_question_scores_and_summarize_from_stored_rows(evaluated):
    _, rows, m = evaluated
    em = question_scores(rows, "em", split="test")
    assert len(em) == 8 and sum(em.values()) / 8 == pytest.approx(m["test_em"])
    sampled = question_scores(rows, "em_sampled", split="test")
    assert sum(sampled.values()) / 8 == pytest.approx(m["test_em_sampled"])
    # the same rows read back give the same metrics (the error counts come from the calls, not the rows)
    assert {**summarize(rows, (1, 2, 4), 200, 5), "tool_errors": 0, "reward_errors": 0} == m
    with pytest.raises(ValueError, match="unknown per-question metric"):
        question_scores(rows, "bleu")


def test_an_evaluation_on_a_broken_tool_or_reward_fails_instead_of_scoring(policy, tokenizer, retriever, questions,
                                                                          monkeypatch):
    """A retriever that errors on every query, or a reward that raises, would give valid-looking zeros: above the
    thresholds the evaluation raises, naming the first failure."""
    from arborl.components.envs.retriever import RetrieverError
    from arborl.components.evaluation.evaluate import ToolErrors
    from arborl.components.verification.scoring import RewardErrors

    class Down:
        def search(self, query):
            raise RetrieverError("connection refused (retrieval server down)")

    backend = HFBackend(policy, tokenizer.pad_token_id, tokenizer.eos_token_id)
    prompts = questions["test"][:6]
    agent = AgentConfig()
    rows, metrics = evaluate_policy(backend, SearchEnv(Down(), tokenizer), prompts, agent, VerifyConfig(),
                                    temperature=1.0, seed=5, max_tool_error_fraction=1.0)
    assert metrics["tool_errors"] > 0  # the test policy searches, and every search failed
    with pytest.raises(ToolErrors, match=r"episodes met a tool error, more than .*connection refused"):
        evaluate_policy(backend, SearchEnv(Down(), tokenizer), prompts, agent, VerifyConfig(), temperature=1.0,
                        seed=5, max_tool_error_fraction=0.0)
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "verification"))
    broken = VerifyConfig(reward={"default": "user_reward_fns:verl_raises"})
    with pytest.raises(RewardErrors, match=r"evaluate \(greedy\): 6 of 6 reward calls failed .*boom in the reward"):
        evaluate_policy(backend, SearchEnv(retriever, tokenizer), prompts, agent, broken,
                        temperature=1.0, seed=5)


def test_a_data_source_with_odd_characters_gives_valid_metric_keys(tmp_path):
    """MLflow refuses some characters in metric names; a data_source's breakdown key is made safe, and a real
    SQLite-backed MLflow run takes every metric of the summary."""
    from mlflow import MlflowClient

    from arborl.components.evaluation.evaluate import metric_safe

    assert metric_safe("nq@2024?v=1") == "nq_2024_v_1" and metric_safe("hotpot/qa dev") == "hotpot/qa dev"
    rows = [{"prompt_id": f"q{i}", "split": "test", "data_source": "nq@2024?v=1", "hops": 1, "mode": mode,
             "sample": 0, "reward": 1.0, "em": 1.0, "f1": 1.0, "answer": "a", "valid_format": True, "tool_calls": 1,
             "generated_tokens": 5, "text": "t"} for i in range(3) for mode in ("greedy", "sampled")]
    metrics = summarize(rows, (1,), 50, 0)
    assert "test_em_src_nq_2024_v_1" in metrics
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    run = client.create_run(client.create_experiment("x")).info.run_id
    for key, value in metrics.items():
        client.log_metric(run, f"eval/{key}", float(value))
