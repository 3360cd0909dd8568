"""Scheduled retraining end to end, all real: a temporary Prefect server, an SQLite MLflow store and registry in
tmp_path, weekly verl Parquet snapshots written by `arborl export-data`, their corpus served by the retrieval
server on 127.0.0.1 (in-process), a base model from the micro prepare + warm-start stages registered with
`arborl seed-champion`, then the `arborl-retrain` flow (flows/deployments.py) on the latest snapshot, rerun
(it resumes), and again once a newer snapshot exists."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from mlflow import MlflowClient
from typer.testing import CliRunner

from arborl.components.artifacts import manifests
from arborl.components.config import load_config
from arborl.components.envs.retrieval_server import start_in_thread
from arborl.components.registry.gate import CHALLENGER, CHAMPION
from arborl.components.stages import STAGES
from arborl.flows.cli import app

ROOT = Path(__file__).resolve().parents[2]
MICRO = str(ROOT / "configs" / "micro.yaml")
LINEAGE = ("arborl.parent_version", "arborl.parent_model_uri", "arborl.data_snapshot", "arborl.config_hash",
           "arborl.data_uri")


def _rejected_event(resource_id: str, flow_run: str | None = None, timeout_s: float = 60.0) -> dict:
    """The `arborl.challenger.rejected` event of `resource_id` (related to the flow run `flow_run`, when given:
    other flow tests of the session may have rejected a model of the same name), read back from the Prefect
    server's event store (events are persisted asynchronously: polled)."""
    from prefect.client.orchestration import get_client

    query = {"filter": {"event": {"name": ["arborl.challenger.rejected"]},
                        "resource": {"id": [resource_id]}, "occurred": {"since": "2020-01-01T00:00:00Z"}}}
    deadline = time.monotonic() + timeout_s
    while True:
        with get_client(sync_client=True) as prefect:
            events = prefect.request("POST", "/events/filter", json=query).json()["events"]
        if flow_run is not None:
            events = [e for e in events if f"prefect.flow-run.{flow_run}" in
                      [r["prefect.resource.id"] for r in e.get("related", [])]]
        if events or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert events, f"no arborl.challenger.rejected event for {resource_id} (flow run {flow_run})"
    return events[0]


@pytest.fixture
def snapshots_and_retriever(tmp_path):
    """A snapshot root holding the first week's snapshot (train part 0 of 2) and the world's corpus served over
    HTTP; yields (snapshot root, retriever URL)."""
    root = tmp_path / "snapshots"
    res = CliRunner().invoke(app, ["export-data", "--config", MICRO, "--out", str(root / "2026-11-23"),
                                   "--parts", "2", "--part", "0"])
    assert res.exit_code == 0, res.output
    server = start_in_thread(str(root / "2026-11-23" / "corpus.jsonl"))
    try:
        yield root, server.url
    finally:
        server.stop()


def test_retrain_from_champion_on_the_latest_snapshot_with_lineage(tmp_path, snapshots_and_retriever, prefect_server):
    from arborl.flows.deployments import retrain

    root, url = snapshots_and_retriever
    runs = tmp_path / "runs"
    # the base model: the micro world's warm start (same world, so its word-level tokenizer covers the snapshots)
    base_cfg = load_config(MICRO, [f"run.output_root={runs}"])
    world = STAGES["prepare"](base_cfg, {}, str(tmp_path / "base" / "prepare")).out
    base = STAGES["warmstart"](base_cfg, {"world": world}, str(tmp_path / "base" / "warmstart")).out

    # margin 0.5: a challenger one RL iteration away from its champion can never clear it, so the gate rejects
    overrides = [f"run.output_root={runs}", "run.name=weekly", "data.source=parquet", f"data.snapshot_root={root}",
                 "search.backend=http", f"search.url={url}", "warmstart.enabled=false", f"model.path={base}",
                 "registry.margin=0.5", "tracking.system_metrics=false"]
    seeded = CliRunner().invoke(app, ["seed-champion", "--config", MICRO, "--model", base, *overrides])
    assert seeded.exit_code == 0, seeded.output
    assert "registered arborl-micro v1" in seeded.output
    store = f"sqlite:///{runs / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=store, registry_uri=store)
    name = "arborl-micro"
    v1 = client.get_model_version_by_alias(name, CHAMPION)
    assert str(v1.version) == "1"
    assert v1.tags["arborl.origin"] == "seed" and v1.tags["arborl.parent_version"] == "none"
    assert v1.tags["arborl.parent_model_uri"] == base and v1.tags["arborl.data_snapshot"] == "none"
    assert client.get_run(v1.run_id).data.tags["arborl.origin"] == "seed"

    # week 1: latest = 2026-11-23, trained from champion v1
    state = retrain(MICRO, overrides, iterations=1, return_state=True)
    assert state.is_completed(), state.message
    first = state.result()
    assert first["run_name"] == "weekly-2026-11-23-from-v1"
    assert first["retrain"] == {"run_name": "weekly-2026-11-23-from-v1", "parent_version": "1",
                                "data_snapshot": "2026-11-23", "champion_after": "1"}
    assert first["iterations"] == 1
    reg = first["registry"]
    assert reg["version"] == "2" and reg["decision"]["decision"] == "reject", reg["decision"]
    assert reg["champion_before"] == "1" and reg["champion_after"] == "1"
    assert str(client.get_model_version_by_alias(name, CHAMPION).version) == "1"  # a rejection moves nothing
    assert str(client.get_model_version_by_alias(name, CHALLENGER).version) == "2"
    # the alert event, related to the pipeline's flow run that gated v2 (a subflow of this retrain)
    pipeline_run = client.get_run(first["mlflow_run_id"]).data.tags["prefect.flow_run_id"]
    assert pipeline_run != str(state.state_details.flow_run_id)
    event = _rejected_event(f"arborl.model.{name}.v2", flow_run=pipeline_run)  # fails unless related to it
    assert event["payload"]["decision"] == "reject" and event["payload"]["delta"] == reg["decision"]["delta"]

    v2 = client.get_model_version(name, "2")
    run1 = client.get_run(first["mlflow_run_id"]).data.tags
    expected = {"arborl.parent_version": "1", "arborl.parent_model_uri": f"models:/{name}/1",
                "arborl.data_snapshot": "2026-11-23", "arborl.data_uri": f"{root}/2026-11-23"}
    for tags in (v2.tags, run1):  # lineage on the registered version and on its MLflow run
        assert {k: tags[k] for k in expected} == expected
        assert tags["arborl.config_hash"] == first["config_hash"]
    # the gate decided on val; test metrics are reported on the version beside the val ones
    assert v2.tags["gate.split"] == "val" and v2.tags["gate.n"] == "8"
    assert float(v2.tags["eval.test_em"]) == first["final"]["test_em"]
    assert float(v2.tags["eval.val_em"]) == first["final"]["val_em"]
    # the run started from the champion's weights, downloaded under its root, without a warm start
    parent_model = runs / "weekly-2026-11-23-from-v1" / "parent_model"
    warm = manifests.read_manifest(str(runs / "weekly-2026-11-23-from-v1" / "warmstart"))["metrics"]
    assert warm["trained"] == 0 and warm["source"] == str(parent_model)
    assert (parent_model / "model.safetensors").exists()

    # the same retrain again resumes its run: same MLflow run, same registered version, no new one
    again = retrain(MICRO, overrides, iterations=1)
    assert again["mlflow_run_id"] == first["mlflow_run_id"] and again["registry"]["version"] == "2"
    assert len(client.search_model_versions(f"name='{name}'")) == 2

    # week 2: a newer snapshot (the other half of the train questions) becomes latest
    res = CliRunner().invoke(app, ["export-data", "--config", MICRO, "--out", str(root / "2026-11-30"),
                                   "--parts", "2", "--part", "1"])
    assert res.exit_code == 0, res.output
    state = retrain(MICRO, overrides, iterations=1, return_state=True)
    assert state.is_completed(), state.message
    second = state.result()
    # its parent is the champion the first gate left in place
    assert second["retrain"]["parent_version"] == first["registry"]["champion_after"] == "1"
    assert second["run_name"] == "weekly-2026-11-30-from-v1"
    v3 = client.get_model_version(name, second["registry"]["version"])
    assert str(v3.version) == "3"
    assert v3.tags["arborl.data_snapshot"] == "2026-11-30" and v3.tags["arborl.parent_version"] == "1"
    assert v3.tags["arborl.data_uri"] == f"{root}/2026-11-30"
    assert v3.tags["gate.split"] == "val" and v3.tags["gate.champion_after"] == "1"
    assert str(client.get_model_version_by_alias(name, CHAMPION).version) == "1"
    for version in (v1, v2, v3):
        assert all(k in client.get_model_version(name, version.version).tags for k in LINEAGE)
    # `arborl report` shows the chain: the seed, then each week's snapshot and the version it started from
    from arborl.flows.report import cells, registry_rows

    rows = registry_rows(load_config(MICRO, overrides))
    assert [cells(row)["lineage"] for row in rows] == ["seed", "2026-11-23 ← v1", "2026-11-30 ← v1"]
