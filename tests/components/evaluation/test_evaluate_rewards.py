"""components.evaluation.evaluate with configured rewards: the `reward` column is the configured reward; em/f1
stay the QA metrics for QA rewards and are the correctness (1/0) for the others."""

from __future__ import annotations

import pytest

from arborl.components.config import AgentConfig, VerifyConfig
from arborl.components.evaluation.evaluate import evaluate_policy
from arborl.components.sampling.agent import SearchEnv
from arborl.components.sampling.engine import HFBackend
from arborl.components.verification.qa_em import score_response


def evaluate(policy, tokenizer, retriever, prompts, verify: VerifyConfig) -> list[dict]:
    backend = HFBackend(policy, tokenizer.pad_token_id, tokenizer.eos_token_id)
    rows, _ = evaluate_policy(backend, SearchEnv(retriever, tokenizer), prompts, AgentConfig(), verify,
                              temperature=1.0, seed=5, pass_k=(2,), bootstrap=10)
    return rows


def test_rewards_follow_the_config(policy, tokenizer, retriever, questions):
    prompts = questions["val"][:4]
    default = evaluate(policy, tokenizer, retriever, prompts, VerifyConfig())
    for r, q in zip(default, prompts * 3, strict=True):
        s = score_response(r["text"], list(q["ground_truth"]), VerifyConfig())
        assert (r["reward"], r["em"], r["f1"]) == (s.reward, float(s.correct), s.f1)
    source = prompts[0]["data_source"]
    f1 = evaluate(policy, tokenizer, retriever, prompts, VerifyConfig(reward={"default": "qa_em", source: "qa_f1"}))
    assert [(r["text"], r["em"], r["f1"]) for r in f1] == [(r["text"], r["em"], r["f1"]) for r in default]
    assert all(r["reward"] == pytest.approx(r["f1"]) for r in f1 if r["data_source"] == source)
    math = evaluate(policy, tokenizer, retriever, prompts, VerifyConfig(reward={"default": "math"}))
    assert all(r["reward"] == r["em"] == r["f1"] and r["em"] in (0.0, 1.0) for r in math)
    assert [r["valid_format"] for r in math] == [r["valid_format"] for r in default]
