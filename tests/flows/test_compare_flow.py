"""`arborl compare` on configs/micro.yaml: a base run, the Tree-GRPO and GRPO runs on a real Prefect server and a
real SQLite MLflow store. Under the default protocol (`shape`) at 2 chains: the paper's (1, 2, 1) trees against 2
chains, no trajectory cut for a pool, realized tokens, tool calls and trajectories per prompt, the primary metric.
Under the opt-in `tokens` protocol at 8 chains: both methods spend the same generated tokens per prompt, to the
token; compare.json, the tables, the signal metrics and the MLflow plots. And the CLI's --budgets."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from mlflow import MlflowClient
from typer.testing import CliRunner

from arborl.flows.cli import app

ROOT = Path(__file__).resolve().parents[2]
MICRO = str(ROOT / "configs" / "micro.yaml")


def _manifest(path: Path) -> dict:
    return json.loads((path / "_manifest.json").read_text())


def test_default_protocol_cuts_nothing_and_reports_realized_cost(tmp_path, prefect_server):
    runs = tmp_path / "runs"
    res = CliRunner().invoke(app, ["compare", "--config", MICRO, "--seeds", "1", "--budgets", "2",
                                   f"run.output_root={runs}", "run.iterations=2", "sampling.prompts_per_iteration=16"])
    assert res.exit_code == 0, res.output
    assert "only chooses the shapes" in res.output and "2 chains" in res.output

    result = json.loads((runs / "micro-compare" / "compare.json").read_text())
    assert result["chain_tokens"] == {}  # no token pool, so no chain unit is needed
    (entry,) = result["budgets"]
    tree, grpo = entry["methods"]["tree_grpo"], entry["methods"]["grpo"]
    assert tree["sampling"] == {"trees_per_prompt": 1, "expansions_per_round": 2, "expansion_rounds": 1,
                                "estimator": "tree"}  # the paper's (1, 2, 1) at 2 chains
    assert grpo["sampling"]["trees_per_prompt"] == 2 and grpo["sampling"]["expansion_rounds"] == 0
    (row,) = result["table"]
    for method, data in entry["methods"].items():
        (run,) = data["per_seed"]
        root = runs / run["run_name"]
        cfg = json.loads((root / "config.json").read_text())
        assert cfg["budget"]["tokens_per_prompt"] is None and cfg["budget"]["chains_per_prompt"] is None
        samples = [_manifest(root / f"iter_00{it}" / "sample")["metrics"] for it in (1, 2)]
        for m in samples:  # no pool anywhere: no trajectory is cut for a budget
            assert m["budget_cuts"] == 0 and m["pool_cut_frac"] == 0.0
            assert 0.0 <= m["truncated_frac"] <= 1.0 and m["tool_calls_per_trajectory"] >= 0.0
        assert data["spend"]["budget_cuts_per_prompt"] == 0
        # realized cost per prompt, from the sample stages, in the table
        for key in ("generated_tokens", "tool_calls", "trajectories"):
            realized = sum(m[key] for m in samples) / 32
            assert data["spend"][f"{key}_per_prompt"] == pytest.approx(realized)
            assert row[f"{method}_{key}"] == pytest.approx(realized)
        labels = [_manifest(root / f"iter_00{it}" / "label")["metrics"] for it in (1, 2)]
        assert all(m["pool_cut_excluded"] == 0 for m in labels)
        # the primary metric: sampled test EM averaged over the evaluations at iterations 1 and 2
        evals = [_manifest(root / f"iter_00{it}" / "eval")["metrics"]["test_em_sampled"] for it in (1, 2)]
        assert run["primary"] == pytest.approx(sum(evals) / 2)
    assert row["grpo_trajectories"] == 2 and row["tree_grpo_trajectories"] == 3  # 1 + L·N leaves per tree
    assert row["grpo_generated_tokens"] > 0 and row["tree_grpo_generated_tokens"] > 0
    assert row["primary_ci_low"] <= row["primary_difference"] <= row["primary_ci_high"]
    assert f"{row['grpo_generated_tokens']:.1f} / {row['tree_grpo_generated_tokens']:.1f}" in res.output
    client = MlflowClient(tracking_uri=f"sqlite:///{runs / 'mlflow.db'}")
    tree_run = tree["per_seed"][0]["mlflow_run_id"]
    for key in ("sample/tool_calls_per_trajectory", "sample/first_step_answer_frac", "sample/truncated_frac"):
        assert sorted(m.step for m in client.get_metric_history(tree_run, key)) == [1, 2]
    assert "em_vs_realized_tokens.png" in {a.path for a in client.list_artifacts(result["mlflow_run_id"])}


def test_tokens_protocol_spends_equal_tokens_per_prompt_on_micro(tmp_path, prefect_server):
    runs = tmp_path / "runs"
    res = CliRunner().invoke(app, ["compare", "--config", MICRO, "--seeds", "1", "--budgets", "8",
                                   f"run.output_root={runs}", "run.iterations=2", "sampling.prompts_per_iteration=32",
                                   "budget.protocol=tokens"])
    assert res.exit_code == 0, res.output
    assert "Tree-GRPO vs GRPO at equal cost" in res.output and "8 chains" in res.output

    result = json.loads((runs / "micro-compare" / "compare.json").read_text())
    (entry,) = result["budgets"]
    unit = result["chain_tokens"]["0"]  # the warm start's mean generated tokens per sampled answer
    assert unit == _manifest(runs / "micro-base-s0" / "warmstart_eval")["metrics"]["val_generated_tokens_sampled"]
    budget = int(8 * unit + 0.5)
    assert entry["chains"] == 8.0 and entry["tokens_per_prompt"] == {"0": budget}
    tree, grpo = entry["methods"]["tree_grpo"], entry["methods"]["grpo"]
    assert tree["sampling"] == {"trees_per_prompt": 4, "expansions_per_round": 2, "expansion_rounds": 1,
                                "estimator": "tree"}  # budget.plan of 8 chains
    assert grpo["sampling"] == {"trees_per_prompt": 4, "expansions_per_round": 2, "expansion_rounds": 0,
                                "estimator": "grpo"}  # as many chains to start, then more

    # budget matching (token_stop: exact): each method spends the budget to the token, so within 3% of each other
    spent = {m: d["spend"]["generated_tokens_per_prompt"] for m, d in entry["methods"].items()}
    assert abs(spent["tree_grpo"] / spent["grpo"] - 1) <= 0.03
    assert entry["token_mismatch"] == pytest.approx(spent["tree_grpo"] / spent["grpo"] - 1)
    assert f"({entry['token_mismatch']:+.1%})" in res.output  # the sweep table shows it
    for method, data in entry["methods"].items():
        assert spent[method] == budget and data["spend"]["budget_deviation"] == 0.0, method
        assert data["spend"]["prompts"] == 64 and data["spend"]["budget_tokens_per_prompt"] == budget
        (run,) = data["per_seed"]
        root = runs / run["run_name"]
        cfg = json.loads((root / "config.json").read_text())
        assert cfg["budget"]["tokens_per_prompt"] == budget and cfg["budget"]["token_stop"] == "exact"
        assert cfg["run"]["warmstart_from"] == str(runs / "micro-base-s0") and not (root / "warmstart").exists()
        samples = [_manifest(root / f"iter_00{it}" / "sample")["metrics"] for it in (1, 2)]
        for key in ("generated_tokens", "prefilled_tokens", "tool_calls", "budget_cuts"):  # the sample stages counted
            assert data["spend"][f"{key}_per_prompt"] == pytest.approx(sum(m[key] for m in samples) / 64)
        # the signal of every iteration, from its label stage
        signal = data["signal"]
        assert [p["iteration"] for p in signal["per_iteration"]] == [1, 2]
        labels = [_manifest(root / f"iter_00{it}" / "label")["metrics"] for it in (1, 2)]
        for point, label in zip(signal["per_iteration"], labels, strict=True):
            for key in ("zero_spread_prompt_frac", "zero_spread_tree_frac", "informative_set_frac",
                        "nonzero_adv_token_frac"):
                assert point[key] == pytest.approx(label[key]) and 0.0 <= label[key] <= 1.0
        assert run["run_name"] == f"micro-b8-{method}-s0"
    assert grpo["signal"]["overall"]["zero_spread_tree_frac"] == 1.0  # a chain is a tree with one leaf

    (row,) = result["table"]
    diff = entry["difference"]
    assert row["difference"] == diff["estimate"] == pytest.approx(row["tree_grpo_em"] - row["grpo_em"])
    assert diff["ci_low"] <= diff["estimate"] <= diff["ci_high"] and diff["questions"] == 12  # micro's test split
    assert row["grpo_generated_tokens"] == spent["grpo"] and row["tokens_per_prompt"] == budget

    client = MlflowClient(tracking_uri=f"sqlite:///{runs / 'mlflow.db'}")
    run = client.get_run(result["mlflow_run_id"])
    assert run.data.metrics["b8/grpo/generated_tokens_per_prompt"] == pytest.approx(spent["grpo"])
    assert run.data.metrics["b8/tree_grpo/final_test_em_mean"] == tree["final_test_em"]["mean"]
    assert {a.path for a in client.list_artifacts(run.info.run_id)} >= {
        "em_vs_realized_tokens.png", "em_vs_generated_tokens.png", "compare.json"}
    assert [m.step for m in client.get_metric_history(run.info.run_id, "tree_grpo/test_em_vs_realized_tokens")] == [
        budget]
    tree_run = tree["per_seed"][0]["mlflow_run_id"]  # the label metrics of every iteration reach MLflow
    for key in ("label/zero_spread_prompt_frac", "label/nonzero_adv_token_frac", "label/depth1_informative_set_frac"):
        assert sorted(m.step for m in client.get_metric_history(tree_run, key)) == [1, 2]
    assert client.search_registered_models() == []  # comparison runs are never registry candidates


def test_cli_parses_budgets(monkeypatch):
    import arborl.flows.compare as compare_flow

    calls = []

    def fake(config, seeds, budgets):
        calls.append((seeds, budgets))
        return {"budgets": [], "table": [], "budget_rule": "the rule", "out": "x/compare.json", "mlflow_run_id": None}

    monkeypatch.setattr(compare_flow, "compare_pipeline", fake)
    runner = CliRunner()
    res = runner.invoke(app, ["compare", "--config", MICRO, "--seeds", "2", "--budgets", "2,4,8"])
    assert res.exit_code == 0, res.output
    res = runner.invoke(app, ["compare", "--config", MICRO])
    assert res.exit_code == 0, res.output
    assert calls == [(2, [2.0, 4.0, 8.0]), (3, None)]
    res = runner.invoke(app, ["compare", "--config", MICRO, "--budgets", "2,x"])
    assert res.exit_code == 2 and "--budgets" in res.output and len(calls) == 2
