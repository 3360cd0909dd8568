"""The deployable flows' own logic: the `arborl-train` flow through a real temporary Prefect server and SQLite
MLflow store (lineage tags of a plain run, a config path found from another working directory, a bad config
failing the flow run with the file named), the retrain plan with and without a champion, and `seed-champion`'s
errors."""

from __future__ import annotations

from pathlib import Path

import pytest
from mlflow import MlflowClient
from typer.testing import CliRunner

from arborl.components.config import ConfigError, load_config
from arborl.flows.cli import app
from arborl.flows.deployments import config_path, plan_retrain, retrain, retrain_run_name, train

ROOT = Path(__file__).resolve().parents[2]
MICRO = ROOT / "configs" / "micro.yaml"


def test_train_flow_records_lineage_of_a_plain_run(tmp_path, monkeypatch, prefect_server):
    runs = tmp_path / "runs"
    monkeypatch.chdir(tmp_path)  # a worker elsewhere: the repository-relative path still resolves
    assert config_path("configs/micro.yaml") == MICRO
    summary = train("configs/micro.yaml", [f"run.output_root={runs}", "run.iterations=0", "registry.enabled=false",
                                           "tracking.system_metrics=false"])
    assert summary["iterations"] == 0 and summary["run_name"] == "micro"
    lineage = {"arborl.parent_version": "none", "arborl.parent_model_uri": "none", "arborl.data_snapshot": "none",
               "arborl.data_uri": "synthetic", "arborl.config_hash": summary["config_hash"]}
    assert summary["lineage"] == lineage
    tags = MlflowClient(tracking_uri=f"sqlite:///{runs / 'mlflow.db'}").get_run(summary["mlflow_run_id"]).data.tags
    assert {k: tags[k] for k in lineage} == lineage
    assert tags["arborl.config_file"] == str(MICRO)

    state = train(str(tmp_path / "missing.yaml"), return_state=True)
    assert state.is_failed()
    with pytest.raises(ConfigError, match="config file not found: .*missing.yaml"):
        state.result()
    state = train(str(MICRO), ["train.clip_low=2"], return_state=True)
    with pytest.raises(ConfigError, match="key 'train.clip_low'"):
        state.result()


def test_retrain_needs_the_registry(tmp_path, prefect_server):
    state = retrain(str(MICRO), [f"run.output_root={tmp_path}", "registry.enabled=false"], return_state=True)
    assert state.is_failed()
    with pytest.raises(ValueError, match="retrain needs registry.enabled and tracking.enabled"):
        state.result()


def test_retrain_plan_with_and_without_a_champion(tmp_path):
    assert retrain_run_name("weekly", "2026-11-30", "7") == "weekly-2026-11-30-from-v7"
    assert retrain_run_name("weekly", "none", None) == "weekly-from-none"
    assert retrain_run_name("weekly", "nq 30/11", "2") == "weekly-nq_30_11-from-v2"

    cfg = load_config(MICRO, [f"run.output_root={tmp_path}", f"run.warmstart_from={tmp_path / 'other'}"])
    fresh, lineage = plan_retrain(cfg, None)  # no champion: the config's own start model, parent none
    assert fresh.run.name == "micro-from-none" and fresh.warmstart.enabled and fresh.model.path is None
    assert fresh.run.warmstart_from == cfg.run.warmstart_from
    assert lineage == {"arborl.parent_version": "none"}

    child, lineage = plan_retrain(cfg, "4")
    assert child.run.name == "micro-from-v4"
    assert child.model.path == str(tmp_path / "micro-from-v4" / "parent_model")
    assert not child.warmstart.enabled and child.run.warmstart_from is None
    assert lineage == {"arborl.parent_version": "4", "arborl.parent_model_uri": "models:/arborl-micro/4"}
    # the same inputs give the same run, so a rerun resumes it
    assert plan_retrain(cfg, "4")[0].section_hash() == child.section_hash()


def test_seed_champion_errors_name_the_model(tmp_path):
    missing = tmp_path / "no-model"
    res = CliRunner().invoke(app, ["seed-champion", "--config", str(MICRO), "--model", str(missing),
                                   f"run.output_root={tmp_path}"])
    assert res.exit_code == 2 and str(missing) in res.output and "not a Hugging Face model directory" in res.output
    res = CliRunner().invoke(app, ["seed-champion", "--config", str(MICRO), "--model", str(missing),
                                   "tracking.enabled=false"])
    assert res.exit_code == 2 and "seed-champion needs tracking.enabled" in res.output


def test_run_with_a_missing_snapshot_fails_naming_the_uri(tmp_path, prefect_server):
    root = tmp_path / "snapshots"
    (root / "2026-11-23").mkdir(parents=True)
    res = CliRunner().invoke(app, ["run", "--config", str(MICRO), f"run.output_root={tmp_path / 'runs'}",
                                   "data.source=parquet", f"data.snapshot_root={root}", "data.snapshot=2026-12-07",
                                   "search.backend=http", "search.url=http://127.0.0.1:9", "warmstart.enabled=false",
                                   f"model.path={tmp_path / 'model'}"])
    assert res.exit_code == 2, res.output
    assert f"no folder {root}/2026-12-07" in res.output and "present: 2026-11-23" in res.output
