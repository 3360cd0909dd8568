"""Dashboards of a micro run: MLflow plots, granularity table and tree viewers; Prefect table and progress artifacts."""

from __future__ import annotations

import json
from pathlib import Path

from mlflow import MlflowClient

from arborl.components.config import load_config

ROOT = Path(__file__).resolve().parents[2]


def test_flow_logs_dashboards(tmp_path, prefect_server):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, ArtifactFilterKey

    from arborl.flows.pipeline import train_pipeline

    cfg = load_config(ROOT / "configs" / "micro.yaml", [f"run.output_root={tmp_path / 'runs'}", "run.eval_every=2"])
    state = train_pipeline(cfg.model_dump(mode="json"), return_state=True)
    summary = state.result()
    flow_run_id = state.state_details.flow_run_id

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}")
    run_id = summary["mlflow_run_id"]
    listed = {a.path: a for a in client.list_artifacts(run_id)}
    assert {"plots", "trees", "granularity.json"} <= set(listed)
    plots = {a.path: a.file_size for a in client.list_artifacts(run_id, "plots")}
    assert set(plots) == {"plots/curves.png", "plots/granularity.png"} and min(plots.values()) > 1000
    assert [a.path for a in client.list_artifacts(run_id, "trees")] == ["trees/iter_001.html", "trees/iter_002.html"]
    local = Path(client.download_artifacts(run_id, "", str(tmp_path / "dl")))
    assert (local / "plots" / "curves.png").read_bytes().startswith(b"\x89PNG")
    assert "<script" in (local / "trees" / "iter_002.html").read_text()

    # the MLflow table holds both iterations' label reports, as written by the label stages
    table = json.loads((local / "granularity.json").read_text())
    rows = [dict(zip(table["columns"], r, strict=True)) for r in table["data"]]
    for it in (1, 2):
        report = json.loads((tmp_path / "runs" / "micro" / f"iter_00{it}" / "label" / "granularity.json").read_text())
        assert [{k: v for k, v in r.items() if k != "iteration"} for r in rows if r["iteration"] == it] == report
        assert report and report[0]["depth"] == 1
    history = client.get_metric_history(run_id, "label/depth1_branch_points")
    assert sorted(m.step for m in history) == [1, 2]
    assert all(m.value >= cfg.sampling.prompts_per_iteration for m in history)  # M = 2 first steps per prompt

    with get_client(sync_client=True) as prefect:
        def artifacts(key):
            return prefect.read_artifacts(artifact_filter=ArtifactFilter(
                key=ArtifactFilterKey(any_=[key]), flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id])))

        tables = artifacts("iteration-table")
        progress = artifacts("rl-progress")
    assert len(tables) == 2 and {t.type for t in tables} == {"table"}  # one per iteration
    latest = json.loads(max(tables, key=lambda t: t.created).data)
    assert [r["iteration"] for r in latest] == [1, 2]
    assert latest[1]["test_em"] == summary["final"]["test_em"] and latest[0]["test_em"] is None  # eval every 2
    assert [r["reward_mean"] for r in latest] == [round(h["reward_mean"], 4) for h in summary["history"]]
    assert len(progress) == 1 and progress[0].type == "progress" and float(progress[0].data) == 100.0

    # resuming after iteration 2's label output was lost redoes that stage; the table keeps one copy of each row
    (tmp_path / "runs" / "micro" / "iter_002" / "label" / "_manifest.json").unlink()
    assert train_pipeline(cfg.model_dump(mode="json"))["mlflow_run_id"] == run_id
    again = json.loads(Path(client.download_artifacts(run_id, "granularity.json", str(tmp_path / "dl2"))).read_text())
    assert again == table
