"""components.evaluation.compare: the equal-budget chain count, per-method configs, curves and aggregation."""

from __future__ import annotations

import pytest

from arborl.components.config import BudgetConfig, Config, SamplingConfig
from arborl.components.evaluation.compare import aggregate, budget_rule, grpo_chains, method_config, run_curve
from arborl.components.sampling import budget


def _cfg(m: int, n: int, rounds: int, c: float = 0.5, b: float | None = None) -> Config:
    return Config.model_validate({
        "sampling": {"trees_per_prompt": m, "expansions_per_round": n, "expansion_rounds": rounds},
        "budget": {"expansion_cost": c, "chains_per_prompt": b},
    })


def test_grpo_chains_follow_the_cost_model():
    assert grpo_chains(_cfg(2, 2, 1)) == 4  # 2 · (1 + 2·½): Tree-GRPO's official setting
    assert grpo_chains(_cfg(3, 2, 0)) == 3  # chain mode costs M
    assert grpo_chains(_cfg(2, 4, 2)) == 10  # 2 · (1 + 2·4·½)
    assert grpo_chains(_cfg(1, 3, 1)) == 3  # 2.5 rounds half up, as `plan` does
    assert grpo_chains(_cfg(2, 2, 1, c=0.59)) == 4  # 4.36
    assert grpo_chains(_cfg(2, 2, 1, c=0.75)) == 5
    assert grpo_chains(_cfg(2, 2, 1, c=1.0)) == 6  # an expansion as dear as a chain: a trajectory each
    assert "= 4 " in budget_rule(_cfg(2, 2, 1)) and "budget.expansion_cost" in budget_rule(_cfg(2, 2, 1))


@pytest.mark.parametrize("c", [0.25, 0.5, 0.59, 2 / 3, 0.75, 1.0])
@pytest.mark.parametrize("b", [None, 3.0, 4.0, 7.0, 16.0])
def test_grpo_count_and_plan_share_one_cost_model(c, b):
    """compare's GRPO chain count is the planned cost of the tree run's sampling (after `plan`), rounded as
    `plan` rounds a chain-mode budget, under the configured `budget.expansion_cost`."""
    cfg = _cfg(2, 2, 1, c=c, b=b)
    tree = method_config(cfg, "tree_grpo", 0)
    planned = budget.plan(tree.sampling, tree.budget)
    cost = budget.planned_chains(planned, c)
    grpo = method_config(cfg, "grpo", 0)
    assert grpo.sampling.trees_per_prompt == max(1, int(cost + 0.5)) == budget.equal_budget_chains(planned, c)
    assert grpo.sampling.expansion_rounds == 0
    # the GRPO run's own sampler plan keeps that count, and a chain-mode plan at the tree's cost gives it too
    assert budget.plan(grpo.sampling, grpo.budget).trees_per_prompt == grpo.sampling.trees_per_prompt
    chain_mode = SamplingConfig(expansion_rounds=0)
    as_budget = budget.plan(chain_mode, BudgetConfig(chains_per_prompt=cost, expansion_cost=c))
    assert as_budget.trees_per_prompt == grpo.sampling.trees_per_prompt


def test_compare_uses_the_budget_modules_cost_function(monkeypatch):
    """No second copy of the rule: replacing `budget.planned_chains` changes compare's count."""
    cfg = _cfg(2, 2, 1)
    assert method_config(cfg, "grpo", 0).sampling.trees_per_prompt == 4
    monkeypatch.setattr(budget, "planned_chains", lambda sampling, c: 11.0)
    assert method_config(cfg, "grpo", 0).sampling.trees_per_prompt == 11


def test_expansion_cost_changes_the_grpo_count():
    counts = [method_config(_cfg(2, 2, 1, c=c), "grpo", 0).sampling.trees_per_prompt for c in (0.25, 0.5, 1.0)]
    assert counts == [3, 4, 6]
    counts = [method_config(_cfg(4, 4, 1, c=c), "grpo", 0).sampling.trees_per_prompt for c in (0.25, 0.5, 0.59)]
    assert counts == [8, 12, 13]  # 4 · (1 + 4c): 8, 12, 13.44


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
