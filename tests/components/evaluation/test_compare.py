"""components.evaluation.compare and compare_stats: budgets and per-method configs, the paired interval of the
sweep table on hand-made per-question rows, what each method spent, curves and aggregation."""

from __future__ import annotations

import numpy as np
import pytest

from arborl.components.config import Config
from arborl.components.evaluation.compare import (
    base_config,
    budget_rule,
    chain_tokens,
    method_config,
    parse_budgets,
    run_name,
    sweep,
    token_budget,
    tree_sampling,
)
from arborl.components.evaluation.compare_stats import (
    RunRecord,
    add_interpolations,
    aggregate,
    compare_budget,
    interpolated_difference,
    paired_difference,
    question_differences,
    run_curve,
    spend,
    sweep_table,
)
from arborl.components.evaluation.metrics import paired_bootstrap


def _cfg(**budget) -> Config:
    return Config.model_validate({"sampling": {"trees_per_prompt": 2, "expansions_per_round": 2,
                                               "expansion_rounds": 1}, "budget": budget})


def test_parse_budgets():
    assert parse_budgets("2,4,8") == [2.0, 4.0, 8.0]
    assert parse_budgets(" 3 , 1.5 ") == [3.0, 1.5]
    for bad in ("", "2,x", "0,4", "-1", "4,4", "nan"):
        with pytest.raises(ValueError, match="budgets"):
            parse_budgets(bad)


def test_sweep_defaults_to_the_configs_one_budget():
    assert sweep(_cfg(), [2.0, 8.0]) == [2.0, 8.0]
    assert sweep(_cfg()) == [4.0]  # what M=2, N=2, L=1 trees cost at c = ½
    assert sweep(_cfg(expansion_cost=0.75)) == [5.0]
    assert sweep(_cfg(chains_per_prompt=6.0)) == [6.0]
    assert sweep(_cfg(tokens_per_prompt=300)) == [None]


def test_token_budget_and_chain_unit():
    assert token_budget(_cfg(), 4.0, 12.94) == 52 and token_budget(_cfg(), 2.5, 3.0) == 8  # 7.5 half up
    assert token_budget(_cfg(tokens_per_prompt=300), None, 12.94) == 300
    with pytest.raises(ValueError, match="tokens_per_prompt"):
        token_budget(_cfg(), None, 10.0)
    assert chain_tokens({"val_generated_tokens_sampled": 12.5, "test_generated_tokens_sampled": 9.0}) == 12.5
    assert chain_tokens({"test_generated_tokens_sampled": 9.0}) == 9.0
    with pytest.raises(ValueError, match="chain unit"):
        chain_tokens({"val_em": 0.1})


def test_tree_shape_follows_the_plan_of_each_budget():
    shapes = {b: tree_sampling(_cfg(protocol="tokens"), b) for b in (2.0, 4.0, 8.0)}
    assert [(s.trees_per_prompt, s.expansions_per_round, s.expansion_rounds) for s in shapes.values()] == [
        (1, 2, 1), (2, 2, 1), (4, 2, 1)]
    assert tree_sampling(_cfg(tokens_per_prompt=100), None) == _cfg().sampling


def test_shape_protocol_gives_the_papers_shapes_and_no_token_pool():
    cfg = _cfg()  # budget.protocol: shape is the default
    shapes = {b: tree_sampling(cfg, b) for b in (2.0, 4.0, 8.0, 16.0)}
    assert [(s.trees_per_prompt, s.expansions_per_round, s.expansion_rounds) for s in shapes.values()] == [
        (1, 2, 1), (2, 2, 1), (4, 2, 1), (4, 5, 1)]  # Tree-GRPO's paper, against 2, 4, 8, 16 chains
    assert tree_sampling(cfg, 6.0).trees_per_prompt == 3  # a budget not listed: budget.plan's shape
    assert tree_sampling(_cfg(shapes={8: [2, 6, 1]}), 8.0).expansions_per_round == 6
    for b, (m, n, rounds) in ((2.0, (1, 2, 1)), (8.0, (4, 2, 1))):
        tree = method_config(cfg, "tree_grpo", 1, None, b)
        grpo = method_config(cfg, "grpo", 1, None, b)
        for c in (tree, grpo):  # no pool: nothing is ever cut for a budget
            budget = c.budget
            assert (budget.tokens_per_prompt, budget.chains_per_prompt, budget.token_stop) == (None, None, "reach")
        assert (tree.sampling.trees_per_prompt, tree.sampling.expansions_per_round,
                tree.sampling.expansion_rounds, tree.advantage.estimator) == (m, n, rounds, "tree")
        assert (grpo.sampling.trees_per_prompt, grpo.sampling.expansion_rounds, grpo.advantage.estimator) == (
            int(b), 0, "grpo")  # B independent chains
    with pytest.raises(ValueError, match="budget of chains"):
        method_config(cfg, "grpo", 0, None, None)
    rule = budget_rule(cfg, [2.0, 8.0], {})
    assert "only chooses the shapes" in rule and "(1, 2, 1), GRPO 2 chains" in rule and "(4, 2, 1), GRPO 8" in rule
    assert "round(" not in rule and "Primary metric" in rule


def test_method_configs_share_the_token_budget():
    cfg = _cfg(protocol="tokens")
    tree = method_config(cfg, "tree_grpo", 5, 104, 8.0, name=run_name(cfg, "tree_grpo", 5, 8.0),
                         warmstart_from="runs/tiny-base-s5")
    grpo = method_config(cfg, "grpo", 5, 104, 8.0, name=run_name(cfg, "grpo", 5, 8.0))
    for c in (tree, grpo):
        assert (c.budget.tokens_per_prompt, c.budget.chains_per_prompt, c.budget.token_stop) == (104, None, "exact")
        assert c.run.seed == 5 and not c.registry.enabled and c.sampling.trees_per_prompt == 4
    assert tree.run.name == "tiny-b8-tree_grpo-s5" and tree.run.warmstart_from == "runs/tiny-base-s5"
    assert (tree.sampling.expansion_rounds, tree.advantage.estimator) == (1, "tree")
    assert grpo.run.name == "tiny-b8-grpo-s5" and grpo.run.warmstart_from is None
    assert (grpo.sampling.expansion_rounds, grpo.advantage.estimator) == (0, "grpo")  # M chains, then more
    assert method_config(cfg, "grpo", 0, 50).run.name == "tiny-grpo-s0"
    assert method_config(_cfg(protocol="tokens", token_stop="nearest"), "grpo", 0, 50).budget.token_stop == "nearest"
    with pytest.raises(ValueError, match="unknown method"):
        method_config(cfg, "ppo", 0, 50)
    base = base_config(cfg, 3)
    assert (base.run.name, base.run.seed, base.run.iterations, base.registry.enabled) == ("tiny-base-s3", 3, 0, False)
    rule = budget_rule(cfg, [2.0, 8.0], {0: 12.94, 1: 10.0})
    assert "round(8 x chain) = 104, 80" in rule and "seed 0: 12.94" in rule and "M=1" in rule
    assert "warm-start policy" in rule
    assert "gold chain" in budget_rule(_cfg(protocol="tokens", chain_unit="gold"), [2.0], {0: 22.3})


def test_paired_difference_is_the_question_bootstrap_for_one_seed():
    rng = np.random.default_rng(0)
    a, b = rng.integers(0, 2, 200).astype(float), rng.integers(0, 2, 200).astype(float)
    got = paired_difference({0: a - b}, resamples=4000, seed=1)
    ref = paired_bootstrap(a, b, resamples=4000, seed=3)
    assert got.estimate == pytest.approx(float((a - b).mean()))
    assert got.low == pytest.approx(ref.low, abs=0.015) and got.high == pytest.approx(ref.high, abs=0.015)


def test_paired_difference_over_seeds_and_questions():
    # seed 0: tree right on 3 of 4 questions GRPO missed; seed 1: no difference at all
    diffs = {0: [1.0, 1.0, 1.0, 0.0], 1: [0.0, 0.0, 0.0, 0.0]}
    got = paired_difference(diffs, resamples=2000)
    assert got.estimate == pytest.approx((0.75 + 0.0) / 2)  # seeds weigh the same
    assert got.low == 0.0 and got.high == 1.0  # drawing seed 1 twice, or seed 0's three wins twice
    same = paired_difference({0: [0.5] * 10, 1: [0.5] * 10})
    assert (same.estimate, same.low, same.high) == (0.5, 0.5, 0.5)
    wide = paired_difference({0: [1.0, 0.0] * 20}, resamples=2000)
    assert wide.low < 0.5 < wide.high
    with pytest.raises(ValueError):
        paired_difference({})


def _summary(final: float, warm: float, history: list[dict]) -> dict:
    return {"final": {"test_em": final, "test_em_sampled": final}, "warmstart": {"test_em": warm},
            "history": history, "mlflow_run_id": None}


def _stats(*generated: int, prefilled: int = 10, tools: int = 1) -> dict:
    return {f"q{i}": {"trees": 2, "generated_tokens": g, "prefilled_tokens": prefilled, "tool_calls": tools,
                      "trajectories": 4, "position": i} for i, g in enumerate(generated)}


def _record(seed: int, method: str, test_em: dict, generated: list[int], label: list[dict], final: float,
            tokens: int = 100) -> RunRecord:
    cfg = method_config(_cfg(), method, seed, tokens)
    cfg.run.iterations, cfg.sampling.prompts_per_iteration = 1, len(generated)
    summary = _summary(final, 0.1, [{"iteration": 1, "generated_tokens": sum(generated), "test_em": final}])
    return RunRecord(seed, summary, cfg, sample=[{}], prompt_stats=[_stats(*generated)], label=label,
                     test_em=test_em)


LABEL = {"prompt_groups": 4, "zero_spread_prompts": 1, "tree_groups": 8, "zero_spread_trees": 2,
         "branch_points": 10, "informative_sets": 5, "trainable_tokens": 100, "nonzero_adv_tokens": 60,
         "depth1_branch_points": 4, "depth1_informative_sets": 3}


def test_sweep_table_pairs_questions_within_each_seed():
    """Hand-made per-question rows: the two methods of a seed answer the same questions; another seed asks others."""
    runs = {
        "tree_grpo": [_record(0, "tree_grpo", {"a": 1.0, "b": 1.0, "c": 0.0, "d": 1.0}, [98, 103], [LABEL], 0.75),
                      _record(1, "tree_grpo", {"x": 1.0, "y": 0.0}, [100, 101], [LABEL], 0.5)],
        "grpo": [_record(0, "grpo", {"a": 0.0, "b": 1.0, "c": 0.0, "d": 0.0}, [95, 102], [LABEL], 0.25),
                 _record(1, "grpo", {"x": 1.0, "y": 0.0, "z": 1.0}, [104, 99], [LABEL], 0.5)],
    }
    assert question_differences(runs["tree_grpo"], runs["grpo"]) == {0: [1.0, 0.0, 0.0, 1.0], 1: [0.0, 0.0]}
    entry = compare_budget(4.0, runs)
    diff = entry["difference"]
    assert diff["estimate"] == pytest.approx((0.5 + 0.0) / 2) and (diff["seeds"], diff["questions"]) == (2, 6)
    assert diff["ci_low"] <= diff["estimate"] <= diff["ci_high"] and diff["ci_low"] == 0.0
    tree, grpo = entry["methods"]["tree_grpo"]["spend"], entry["methods"]["grpo"]["spend"]
    assert tree["generated_tokens_per_prompt"] == pytest.approx(402 / 4)
    assert grpo["generated_tokens_per_prompt"] == pytest.approx(400 / 4)
    assert entry["token_mismatch"] == pytest.approx(402 / 400 - 1)
    assert tree["budget_deviation"] == pytest.approx((2 + 3 + 0 + 1) / 4 / 100)
    assert entry["tokens_per_prompt"] == {"0": 100, "1": 100}
    (row,) = sweep_table([entry])
    assert (row["chains"], row["tokens_per_prompt"], row["grpo_em"], row["tree_grpo_em"]) == (4.0, 100, 0.375, 0.625)
    assert row["difference"] == diff["estimate"] and (row["ci_low"], row["ci_high"]) == (diff["ci_low"],
                                                                                        diff["ci_high"])
    assert row["grpo_generated_tokens"] == 100 and row["tree_grpo_tool_calls"] == 1
    signal = entry["methods"]["tree_grpo"]["signal"]
    assert signal["overall"]["zero_spread_prompt_frac"] == 0.25 and signal["overall"]["nonzero_adv_token_frac"] == 0.6
    assert signal["per_iteration"][0]["iteration"] == 1
    assert signal["overall"]["depth1_informative_set_frac"] == 0.75


def test_spend_leaves_out_unsampled_and_bad_prompts():
    rec = _record(0, "grpo", {}, [90, 110], [], 0.0)
    rec.prompt_stats[0]["bad"] = {"position": 5, "bad": "empty prompt"}
    rec.prompt_stats[0]["q1"]["bad"] = "tool error: x"
    got = spend([rec])
    assert got["prompts"] == 1 and got["generated_tokens_per_prompt"] == 90 and got["budget_deviation"] == 0.1


def test_curve_and_aggregate():
    h = [{"iteration": 1, "generated_tokens": 100}, {"iteration": 2, "generated_tokens": 120, "test_em": 0.4}]
    s1, s2 = _summary(0.4, 0.1, h), _summary(0.6, 0.1, [dict(r, test_em=0.6) if "test_em" in r else r for r in h])
    assert run_curve(s1) == [{"iteration": 0, "generated_tokens": 0, "test_em": 0.1},
                             {"iteration": 2, "generated_tokens": 220, "test_em": 0.4}]
    cfg = Config.model_validate({"run": {"iterations": 2}, "sampling": {"prompts_per_iteration": 10}})
    res = aggregate({"tree_grpo": [RunRecord(0, s1, cfg), RunRecord(1, s2, cfg)]})["methods"]["tree_grpo"]
    em = res["final_test_em"]
    assert em["mean"] == pytest.approx(0.5) and em["seeds"] == 2
    assert em["ci_high"] - 0.5 == pytest.approx(12.7062 * 0.1, rel=1e-4)  # t(0.975, 1) · sd / sqrt(2)
    assert res["generated_tokens_per_prompt"] == pytest.approx(220 / 20)
    assert res["curve"][-1] == {"iteration": 2, "generated_tokens": 220, "test_em": pytest.approx(0.5)}


def test_primary_metric_averages_sampled_em_over_the_evaluations():
    """Hand-made per-question sampled EM at iterations 10 and 20: a question's score is its mean over both, the
    run's primary metric the mean over questions, and the paired difference pairs questions within a seed."""
    cfg = _cfg()
    a = _record(0, "tree_grpo", {"q": 1.0, "r": 0.0}, [100], [LABEL], 0.5)
    b = _record(0, "grpo", {"q": 0.0, "r": 0.0}, [100], [LABEL], 0.0)
    a.sampled_test_em = {10: {"q": 0.5, "r": 0.25}, 20: {"q": 1.0, "r": 0.75}}
    b.sampled_test_em = {10: {"q": 0.25, "r": 0.0}, 20: {"q": 0.25, "r": 0.5}}
    assert a.primary_scores() == {"q": 0.75, "r": 0.5} and a.primary() == pytest.approx(0.625)
    assert b.primary() == pytest.approx(0.25)
    assert RunRecord(0, {}, cfg).primary_scores() == {}
    assert question_differences([a], [b], "primary") == {0: [0.5, 0.25]}
    entry = compare_budget(2.0, {"tree_grpo": [a], "grpo": [b]}, resamples=200)
    assert entry["primary_difference"]["estimate"] == pytest.approx(0.375)
    assert entry["methods"]["tree_grpo"]["primary"]["mean"] == pytest.approx(0.625)
    (row,) = sweep_table([entry])
    assert row["primary_difference"] == pytest.approx(0.375) and row["tree_grpo_primary"] == pytest.approx(0.625)
    assert row["primary_ci_low"] <= 0.375 <= row["primary_ci_high"]


def test_tree_em_interpolated_at_grpo_realized_tokens():
    """Tree-GRPO realized 100 and 200 tokens per prompt at two budgets; GRPO realized 150 at the second: the
    interpolated Tree score is the midpoint, per question, minus GRPO's. Outside the trees' range there is none."""
    t_lo = _record(0, "tree_grpo", {"a": 0.0, "b": 1.0}, [100], [LABEL], 0.5)
    t_hi = _record(0, "tree_grpo", {"a": 1.0, "b": 1.0}, [200], [LABEL], 1.0)
    g_lo = _record(0, "grpo", {"a": 0.0, "b": 0.0}, [60], [LABEL], 0.0)
    g_hi = _record(0, "grpo", {"a": 0.0, "b": 1.0}, [150], [LABEL], 0.5)
    got = interpolated_difference([(100.0, [t_lo]), (200.0, [t_hi])], 150.0, [g_hi], resamples=200)
    assert got["estimate"] == pytest.approx(((0.5 - 0.0) + (1.0 - 1.0)) / 2) and got["tokens"] == 150.0
    assert got["ci_low"] <= got["estimate"] <= got["ci_high"]
    at_end = interpolated_difference([(100.0, [t_lo]), (200.0, [t_hi])], 200.0, [g_hi], resamples=200)
    assert at_end["estimate"] == pytest.approx(0.5)  # exactly the upper budget's scores
    assert interpolated_difference([(100.0, [t_lo]), (200.0, [t_hi])], 60.0, [g_lo]) is None
    entries = [compare_budget(b, runs, resamples=200) for b, runs in
               ((2.0, {"tree_grpo": [t_lo], "grpo": [g_lo]}), (4.0, {"tree_grpo": [t_hi], "grpo": [g_hi]}))]
    add_interpolations(entries, [{"tree_grpo": [t_lo], "grpo": [g_lo]}, {"tree_grpo": [t_hi], "grpo": [g_hi]}],
                       resamples=200)
    assert entries[0]["tree_at_grpo_tokens"]["final"] is None  # GRPO's 60 tokens: below the trees' 100
    assert entries[1]["tree_at_grpo_tokens"]["final"]["estimate"] == pytest.approx(0.25)
    rows = sweep_table(entries)
    assert rows[0]["interpolated_final_estimate"] is None
    assert rows[1]["interpolated_final_estimate"] == pytest.approx(0.25)
