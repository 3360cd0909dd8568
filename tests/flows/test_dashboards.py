"""Dashboards of one micro run (shared by the tests of this module), read back from a real Prefect server and a
real SQLite MLflow store: MLflow plots, tables, tags, dataset inputs, summary and system metrics, the registered
version; Prefect artifacts, task-run names, logs and the clean-up of a stale flow run; `arborl report`."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
from mlflow import MlflowClient
from typer.testing import CliRunner

from arborl.components.config import load_config
from arborl.components.tracking.store import git_commit

ROOT = Path(__file__).resolve().parents[2]
MICRO = ROOT / "configs" / "micro.yaml"


@pytest.fixture(scope="module")
def micro_run(tmp_path_factory, prefect_server):
    """A micro run (evaluating every 2 iterations), started while Prefect still shows an earlier flow run of the
    same run as Running (its process was killed)."""
    from prefect.client.orchestration import get_client
    from prefect.states import Running

    from arborl.flows.pipeline import train_pipeline

    tmp = tmp_path_factory.mktemp("dashboards")
    overrides = [f"run.output_root={tmp / 'runs'}", "run.eval_every=2"]
    cfg = load_config(MICRO, overrides)
    config = cfg.model_dump(mode="json")
    with get_client(sync_client=True) as prefect:
        stale = prefect.create_flow_run(train_pipeline, name=cfg.run.name, parameters={"config": config},
                                        state=Running())
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "1")
        state = train_pipeline(config, str(MICRO), return_state=True)
    summary = state.result()
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp / 'runs' / 'mlflow.db'}")
    return SimpleNamespace(tmp=tmp, cfg=cfg, overrides=overrides, summary=summary, client=client,
                           run_id=summary["mlflow_run_id"], flow_run_id=state.state_details.flow_run_id,
                           stale_id=stale.id)


def _artifacts(flow_run_id, key: str | None = None) -> list:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, ArtifactFilterKey

    with get_client(sync_client=True) as prefect:
        return prefect.read_artifacts(artifact_filter=ArtifactFilter(
            key=ArtifactFilterKey(any_=[key]) if key else None,
            flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id])))


def test_artifact_keys_and_task_run_names_are_valid():
    from prefect.types.names import raise_on_name_alphanumeric_dashes_only as prefect_check

    from arborl.flows.links import artifact_key
    from arborl.flows.logs import task_run_label

    assert artifact_key("tiny_v2.1", "promotion", "arborl-tiny") == "tiny-v2-1-promotion-arborl-tiny"
    assert artifact_key("--", "") == "arborl"
    assert prefect_check(artifact_key("Run_A.b", "summary")) == "run-a-b-summary"
    assert task_run_label("verify", 7) == "verify-it007" and task_run_label("register") == "register"
    assert task_run_label("sample", 12, shard=1) == "sample-it012-shard1"


def test_mlflow_plots_granularity_table_and_trees(micro_run):
    r, client, run_id, tmp = micro_run, micro_run.client, micro_run.run_id, micro_run.tmp
    listed = {a.path: a for a in client.list_artifacts(run_id)}
    assert {"plots", "trees", "granularity.json"} <= set(listed)
    plots = {a.path: a.file_size for a in client.list_artifacts(run_id, "plots")}
    assert set(plots) == {"plots/curves.png", "plots/granularity.png", "plots/stage_times.png", "plots/registry.png"}
    assert min(plots.values()) > 1000
    assert [a.path for a in client.list_artifacts(run_id, "trees")] == ["trees/iter_001.html", "trees/iter_002.html"]
    local = Path(client.download_artifacts(run_id, "", str(tmp / "dl")))
    assert (local / "plots" / "stage_times.png").read_bytes().startswith(b"\x89PNG")
    assert "<script" in (local / "trees" / "iter_002.html").read_text()

    # the MLflow table holds both iterations' label reports, as written by the label stages
    table = json.loads((local / "granularity.json").read_text())
    rows = [dict(zip(table["columns"], row, strict=True)) for row in table["data"]]
    for it in (1, 2):
        report = json.loads((tmp / "runs" / "micro" / f"iter_00{it}" / "label" / "granularity.json").read_text())
        assert [{k: v for k, v in row.items() if k != "iteration"} for row in rows if row["iteration"] == it] == report
        assert report and report[0]["depth"] == 1
    history = client.get_metric_history(run_id, "label/depth1_branch_points")
    assert sorted(m.step for m in history) == [1, 2]
    assert all(m.value >= r.cfg.sampling.prompts_per_iteration for m in history)  # M = 2 first steps per prompt


def test_mlflow_summary_and_system_metrics(micro_run):
    summary, metrics = micro_run.summary, micro_run.client.get_run(micro_run.run_id).data.metrics
    final, warm = summary["final"], summary["warmstart"]
    assert metrics["summary/test_em"] == final["test_em"] and metrics["summary/val_em"] == final["val_em"]
    assert metrics["summary/test_em_gain"] == pytest.approx(final["test_em"] - warm["test_em"])
    assert metrics["summary/val_em_gain"] == pytest.approx(final["val_em"] - warm["val_em"])
    assert metrics["summary/wall_seconds"] == summary["wall_seconds"] > 0
    assert "system/cpu_utilization_percentage" in metrics and "system/system_memory_usage_megabytes" in metrics


def test_mlflow_run_links_prefect_git_and_config(micro_run):
    tags = micro_run.client.get_run(micro_run.run_id).data.tags
    assert tags["prefect.flow_run_id"] == str(micro_run.flow_run_id)
    assert tags["prefect.flow_run_name"] == "micro"
    assert tags["prefect.flow_run_url"].startswith("http://") and str(micro_run.flow_run_id) in \
        tags["prefect.flow_run_url"]
    assert tags["arborl.config_file"] == str(MICRO) and tags["arborl.config_hash"] == micro_run.cfg.section_hash()
    assert tags.get("mlflow.source.git.commit") == git_commit()  # None outside a git checkout


def test_mlflow_dataset_inputs_are_the_prompts(micro_run):
    inputs = micro_run.client.get_run(micro_run.run_id).inputs.dataset_inputs
    by_context = {next(t.value for t in d.tags if t.key == "mlflow.data.context"): d.dataset for d in inputs}
    assert set(by_context) == {"train", "val", "test"}
    prompts = micro_run.tmp / "runs" / "micro" / "prepare" / "prompts.parquet"
    for context, dataset in by_context.items():
        assert dataset.name == f"prompts-{context}" and dataset.digest
        assert json.loads(dataset.source)["uri"] == str(prompts)
    counts = {c: json.loads(d.profile)["num_rows"] for c, d in by_context.items()}
    assert counts == {"train": micro_run.cfg.world.num_train, "val": micro_run.cfg.world.num_val,
                      "test": micro_run.cfg.world.num_test}


def test_registered_version_description_and_logged_model_experiment(micro_run):
    client, name = micro_run.client, micro_run.cfg.registry.model_name
    version = client.get_model_version(name, micro_run.summary["registry"]["version"])
    decision = micro_run.summary["registry"]["decision"]
    assert version.description.startswith("Promoted to champion" if decision["decision"] == "promote"
                                           else "Not promoted")
    assert f"on {decision['n']} val questions" in version.description
    assert version.tags["gate.champion_before"] == "-" and version.tags["gate.decided_at"].endswith("Z")
    logged = client.get_logged_model(version.source.split("/")[-1])
    assert client.get_experiment(logged.experiment_id).name == "arborl"
    assert logged.source_run_id == micro_run.run_id


def test_prefect_artifacts_carry_the_run_name(micro_run):
    summary, flow_run_id = micro_run.summary, micro_run.flow_run_id
    by_key: dict[str, list] = {}
    for a in _artifacts(flow_run_id):
        by_key.setdefault(a.key, []).append(a)
    assert set(by_key) == {"micro-progress", "micro-iterations", "micro-summary", "micro-promotion-arborl-micro",
                           "arborl-micro-registry"}
    # one iteration table per flow run, updated in place after each iteration
    [table] = by_key["micro-iterations"]
    rows = json.loads(table.data)
    assert table.type == "table" and [row["iteration"] for row in rows] == [1, 2]
    assert rows[1]["test_em"] == summary["final"]["test_em"] and rows[0]["test_em"] is None  # eval every 2
    assert [row["reward_mean"] for row in rows] == [round(h["reward_mean"], 4) for h in summary["history"]]
    assert table.description == "run micro: iterations 1–2 of 2"
    [progress] = by_key["micro-progress"]
    assert progress.type == "progress" and float(progress.data) == 100.0
    [summary_md] = by_key["micro-summary"]
    assert f"runs:/{micro_run.run_id}" in summary_md.data and "| test_em |" in summary_md.data
    [promotion] = by_key["micro-promotion-arborl-micro"]
    assert "Promotion of arborl-micro v1" in promotion.data and "models:/arborl-micro/1" in promotion.data
    [registry] = by_key["arborl-micro-registry"]
    assert "| v1 |" in registry.data and summary["registry"]["decision"]["decision"] in registry.data


def test_task_run_names_follow_the_scheme(micro_run):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as prefect:
        flow_run = prefect.read_flow_run(micro_run.flow_run_id)
        names = {t.name for t in prefect.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[micro_run.flow_run_id])))}
    assert flow_run.name == "micro"
    per_iteration = {f"{s}-it{i:03d}" for i in (1, 2) for s in ("sample", "verify", "label", "train")}
    assert names == {"prepare", "warmstart", "evaluate-it000", "evaluate-it002", "register", "promote",
                     *per_iteration}


def test_flow_run_logs_hold_the_stage_lines(micro_run):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    with get_client(sync_client=True) as prefect:
        records = prefect.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[micro_run.flow_run_id])))
    lines = [r.message for r in records if r.name.startswith("arborl")]
    assert any(line.startswith("sample-it001 started") for line in lines)
    assert any(line.startswith("train-it002 finished in") and "loss=" in line for line in lines)
    assert any(line.startswith("evaluate-it002 finished in") and "test_em=" in line for line in lines)
    assert any(line.startswith("registered arborl-micro v1") for line in lines)
    assert any(line.startswith("promotion of arborl-micro v1") for line in lines)
    # stage lines are filed under their task runs
    assert all(r.task_run_id is not None for r in records if " started → " in r.message)


def test_a_stale_flow_run_of_the_same_run_is_marked_crashed(micro_run):
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as prefect:
        stale = prefect.read_flow_run(micro_run.stale_id)
    assert stale.state.type.value == "CRASHED" and str(micro_run.flow_run_id) in stale.state.message


def test_report_lists_the_registered_versions(micro_run):
    from arborl.flows import report
    from arborl.flows.cli import app

    decision = micro_run.summary["registry"]["decision"]
    res = CliRunner().invoke(app, ["report", "--config", str(MICRO), *micro_run.overrides], terminal_width=250)
    assert res.exit_code == 0, res.output
    assert "registered versions of arborl-micro" in res.output and "v1" in res.output
    assert decision["decision"] in res.output and "warm start" in res.output
    res = CliRunner().invoke(app, ["report", "--config", str(MICRO), "--json", *micro_run.overrides])
    [row] = json.loads(res.output)
    assert row["version"] == "1" and row["decision"] == decision["decision"] and row["run_id"] == micro_run.run_id
    assert row["challenger"] == pytest.approx(decision["challenger"], abs=1e-5) and row["aliases"]
    # lineage: the synthetic world (no data snapshot), started from the warm start (no parent version)
    assert row["data_snapshot"] is None and row["parent_version"] is None
    assert report.cells(row)["lineage"] == "synthetic ← -"


def test_resume_rewrites_the_tables_without_duplicates(micro_run):
    """Last: resuming after iteration 2's label output was lost redoes that stage; the MLflow table keeps one
    copy of each row and the prompts are not logged again."""
    from arborl.flows.pipeline import train_pipeline

    client, run_id, tmp = micro_run.client, micro_run.run_id, micro_run.tmp
    table = json.loads(Path(client.download_artifacts(run_id, "granularity.json", str(tmp / "dl1"))).read_text())
    (tmp / "runs" / "micro" / "iter_002" / "label" / "_manifest.json").unlink()
    state = train_pipeline(micro_run.cfg.model_dump(mode="json"), return_state=True)
    assert state.result()["mlflow_run_id"] == run_id
    again = json.loads(Path(client.download_artifacts(run_id, "granularity.json", str(tmp / "dl2"))).read_text())
    assert again == table
    assert len(client.get_run(run_id).inputs.dataset_inputs) == 3
    assert client.get_run(run_id).data.tags["prefect.flow_run_id"] == str(state.state_details.flow_run_id)
    assert {a.key for a in _artifacts(state.state_details.flow_run_id, "micro-iterations")} == {"micro-iterations"}
