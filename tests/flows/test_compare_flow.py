"""`arborl compare` on configs/micro.yaml with 2 seeds: four real pipeline runs (Tree-GRPO and GRPO), a real
Prefect server and a real SQLite MLflow store; compare.json, the terminal table and the MLflow plot."""

from __future__ import annotations

import json
from pathlib import Path

from mlflow import MlflowClient
from typer.testing import CliRunner

from arborl.flows.cli import app

ROOT = Path(__file__).resolve().parents[2]


def test_compare_two_seeds_on_micro(tmp_path, prefect_server):
    res = CliRunner().invoke(app, ["compare", "--config", str(ROOT / "configs" / "micro.yaml"), "--seeds", "2",
                                   f"run.output_root={tmp_path / 'runs'}", "run.iterations=2"])
    assert res.exit_code == 0, res.output
    assert "tree_grpo" in res.output and "grpo" in res.output and "generated tokens" in res.output

    result = json.loads((tmp_path / "runs" / "micro-compare" / "compare.json").read_text())
    tree, grpo = result["methods"]["tree_grpo"], result["methods"]["grpo"]
    assert grpo["sampling"] == {"trees_per_prompt": 4, "expansions_per_round": 2, "expansion_rounds": 0,
                                "estimator": "grpo"}
    assert tree["sampling"]["expansion_rounds"] == 1 and tree["sampling"]["estimator"] == "tree"
    for data in (tree, grpo):
        assert [p["seed"] for p in data["per_seed"]] == [0, 1]
        finals = [p["final_test_em"] for p in data["per_seed"]]
        em = data["final_test_em"]
        assert em["mean"] == sum(finals) / 2 and em["ci_low"] <= em["mean"] <= em["ci_high"]
        assert [p["iteration"] for p in data["curve"]] == [0, 1, 2]  # warm start + eval every iteration
        tokens = [p["generated_tokens"] for p in data["curve"]]
        assert tokens[0] == 0 and tokens[0] < tokens[1] < tokens[2]
        for run in data["per_seed"]:  # each run's summary is where the curve came from
            summary = json.loads((tmp_path / "runs" / run["run_name"] / "summary.json").read_text())
            assert run["final_test_em"] == summary["final"]["test_em"]
            assert run["curve"][-1]["generated_tokens"] == sum(h["generated_tokens"] for h in summary["history"])
    for seed in (0, 1):  # the GRPO run of a seed reuses that seed's world and warm start
        assert not (tmp_path / "runs" / f"micro-grpo-s{seed}" / "warmstart").exists()
        grpo_cfg = json.loads((tmp_path / "runs" / f"micro-grpo-s{seed}" / "config.json").read_text())
        assert grpo_cfg["run"]["warmstart_from"] == str(tmp_path / "runs" / f"micro-tree_grpo-s{seed}")
    runs = {p["run_name"] for d in (tree, grpo) for p in d["per_seed"]}
    assert runs == {"micro-tree_grpo-s0", "micro-tree_grpo-s1", "micro-grpo-s0", "micro-grpo-s1"}

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}")
    run = client.get_run(result["mlflow_run_id"])
    assert run.data.metrics["grpo/final_test_em_mean"] == grpo["final_test_em"]["mean"]
    assert {a.path for a in client.list_artifacts(run.info.run_id)} >= {"em_vs_generated_tokens.png", "compare.json"}
    assert len(client.get_metric_history(run.info.run_id, "tree_grpo/test_em_vs_tokens")) == 3
    assert client.search_registered_models() == []  # comparison runs are never registry candidates
