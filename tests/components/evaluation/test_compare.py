"""components.evaluation.compare: the equal-budget chain count, per-method configs, curves and aggregation."""

from __future__ import annotations

import pytest

from arborl.components.config import Config, SamplingConfig
from arborl.components.evaluation.compare import aggregate, matched_chains, method_config, run_curve


def test_matched_chains_follow_the_half_chain_rule():
    assert matched_chains(SamplingConfig(trees_per_prompt=2, expansions_per_round=2, expansion_rounds=1)) == 4
    assert matched_chains(SamplingConfig(trees_per_prompt=3, expansions_per_round=2, expansion_rounds=0)) == 3
    assert matched_chains(SamplingConfig(trees_per_prompt=2, expansions_per_round=4, expansion_rounds=2)) == 10


def test_method_configs():
    cfg = Config()
    grpo = method_config(cfg, "grpo", 5)
    assert (grpo.sampling.expansion_rounds, grpo.sampling.trees_per_prompt, grpo.advantage.estimator) == (0, 4, "grpo")
    assert grpo.run.seed == 5 and grpo.run.name == "tiny-grpo-s5" and not grpo.registry.enabled
    tree = method_config(cfg, "tree_grpo", 5)
    assert tree.sampling == cfg.sampling and tree.advantage.estimator == "tree"
    with pytest.raises(ValueError, match="unknown method"):
        method_config(cfg, "ppo", 0)


def _summary(final: float, warm: float, history: list[dict]) -> dict:
    return {"final": {"test_em": final, "test_em_sampled": final}, "warmstart": {"test_em": warm},
            "history": history, "mlflow_run_id": None}


def test_curve_and_aggregate():
    h = [{"iteration": 1, "generated_tokens": 100}, {"iteration": 2, "generated_tokens": 120, "test_em": 0.4}]
    s1, s2 = _summary(0.4, 0.1, h), _summary(0.6, 0.1, [dict(r, test_em=0.6) if "test_em" in r else r for r in h])
    assert run_curve(s1) == [{"iteration": 0, "generated_tokens": 0, "test_em": 0.1},
                             {"iteration": 2, "generated_tokens": 220, "test_em": 0.4}]
    cfg = Config.model_validate({"run": {"iterations": 2}, "sampling": {"prompts_per_iteration": 10}})
    res = aggregate({"tree_grpo": [(0, s1, cfg), (1, s2, cfg)]})["methods"]["tree_grpo"]
    em = res["final_test_em"]
    assert em["mean"] == pytest.approx(0.5) and em["seeds"] == 2
    assert em["ci_high"] - 0.5 == pytest.approx(12.7062 * 0.1, rel=1e-4)  # t(0.975, 1) · sd / sqrt(2)
    assert res["generated_tokens_per_prompt"] == pytest.approx(220 / 20)
    assert res["curve"][-1] == {"iteration": 2, "generated_tokens": 220, "test_em": pytest.approx(0.5)}
