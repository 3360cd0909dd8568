"""The service deployment end to end on real servers: PostgreSQL-backed Prefect and MLflow servers, a Prefect
process worker, artifacts and run outputs on an S3 server (moto's, on 127.0.0.1). Nothing is mocked.

Select with `pytest -m integration`; `make test` runs it too.
"""

from __future__ import annotations

import json
import re
import subprocess
import time
from pathlib import Path

import httpx
import pytest

from tests.integration import servers

pytestmark = pytest.mark.integration

FLOW_RUN_TIMEOUT_S = 300.0

MODEL = "arborl-micro"  # registry.model_name of configs/micro.yaml
WEEK1, WEEK2 = "2026-11-23", "2026-11-30"


def _arborl(args: list[str], env: dict[str, str], cwd: Path) -> str:
    """Run the `arborl` command in a subprocess; its output, or a test failure showing it."""
    res = subprocess.run([str(servers.BIN / "arborl"), *args], env=env, cwd=cwd, capture_output=True, text=True,
                         timeout=300, stdin=subprocess.DEVNULL)
    assert res.returncode == 0, f"arborl {' '.join(args)} failed ({res.returncode}):\n{res.stdout}\n{res.stderr}"
    return res.stdout


def _deployment_run(stack: servers.Stack, name: str, params: dict, cwd: Path) -> str:
    """`prefect deployment run <name> --params <json>`; the new flow run's id."""
    res = servers.prefect_cli(["deployment", "run", name, "--params", json.dumps(params)], stack.client_env,
                              cwd=cwd)
    found = re.search(r"UUID:\s*([0-9a-f-]{36})", res.stdout)
    assert found, f"no flow run id in:\n{res.stdout}"
    return found.group(1)


def _finished(stack: servers.Stack, flow_run_id: str) -> dict:
    """Wait for the flow run; fail with its logs and the servers' logs unless it Completed."""
    try:
        run = servers.wait_for_flow_run(stack.prefect_api, flow_run_id, FLOW_RUN_TIMEOUT_S, stack.services())
    except servers.ServiceError as exc:
        pytest.fail(f"{exc}\n{stack.logs()}")
    if run["state"]["type"] != "COMPLETED":
        pytest.fail(f"flow run {flow_run_id} ended {run['state']['name']}: {run['state'].get('message')}\n"
                    f"flow run logs:\n{servers.flow_run_logs(stack.prefect_api, flow_run_id)}\n{stack.logs()}")
    return run


def test_scheduled_retrain_deployment_on_real_servers(service_stack, repo_root, tmp_path, request):
    """prefect.yaml's deployments on the PostgreSQL-backed Prefect server; `arborl-retrain` run twice by the
    process worker (started with `prefect deployment run`, as the weekly schedule would) on the micro config,
    with weekly snapshots and run outputs on S3, tracking and registry on the MLflow server (PostgreSQL store,
    artifacts on S3), and the corpus served by `arborl serve-retriever`. Each retrain trains the registry's
    champion on the newest snapshot; lineage chains through the registered versions."""
    from mlflow import MlflowClient

    from arborl.components.config import load_config
    from arborl.components.stages import STAGES

    stack, s3 = service_stack, service_stack.s3
    env = dict(stack.client_env)
    micro = str(repo_root / "configs" / "micro.yaml")
    bucket = f"s3://{s3.bucket}"
    snapshots = f"{bucket}/snapshots"
    started = time.monotonic()
    phases: dict[str, float] = {}

    def phase(name: str) -> None:
        phases[name] = round(time.monotonic() - started - sum(phases.values()), 1)

    # prefect.yaml's deployments, from the repository root, onto the work pool the worker serves: in the
    # background while the data and the base model are made
    deploy = subprocess.Popen([str(servers.BIN / "prefect"), "--no-prompt", "deploy", "--all"], env=env,
                              cwd=repo_root, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              stdin=subprocess.DEVNULL)
    request.addfinalizer(lambda: deploy.poll() is None and deploy.kill())  # when the test fails before it ends

    # week 1's snapshot (train part 0 of 2) on S3, and its corpus served over HTTP
    out = _arborl(["export-data", "--config", micro, "--out", f"{snapshots}/{WEEK1}", "--parts", "2", "--part", "0"],
                  env, tmp_path)
    assert f"wrote {snapshots}/{WEEK1}" in out
    files = ("train.parquet", "val.parquet", "test.parquet", "corpus.jsonl")
    assert {f"snapshots/{WEEK1}/{f}" for f in files} <= set(s3.keys(f"snapshots/{WEEK1}/"))
    port = servers.free_port()
    retriever = servers.Service(
        name="arborl serve-retriever", log=tmp_path / "retriever.log", env=env, cwd=tmp_path,
        cmd=[str(servers.BIN / "arborl"), "serve-retriever", "--corpus", f"{snapshots}/{WEEK1}/corpus.jsonl",
             "--port", str(port)])
    with servers.running(retriever):
        retriever.wait_http(f"http://127.0.0.1:{port}/health", timeout_s=120)
        phase("snapshot and retriever")

        # the base model: the micro world's prepare and warm start (its word-level tokenizer covers the snapshots)
        base_cfg = load_config(micro, [f"run.output_root={tmp_path / 'base-runs'}"])
        world = STAGES["prepare"](base_cfg, {}, str(tmp_path / "base" / "prepare")).out
        base = STAGES["warmstart"](base_cfg, {"world": world}, str(tmp_path / "base" / "warmstart")).out
        overrides = [f"run.output_root={bucket}/runs", "run.name=weekly", f"tracking.mlflow_uri={stack.mlflow_url}",
                     "tracking.system_metrics=false", "data.source=parquet", f"data.snapshot_root={snapshots}",
                     "data.snapshot=latest", "search.backend=http", f"search.url=http://127.0.0.1:{port}",
                     "warmstart.enabled=false", f"model.path={base}"]
        out = _arborl(["seed-champion", "--config", micro, "--model", base, *overrides], env, tmp_path)
        assert f"registered {MODEL} v1" in out
        phase("base model and seed-champion")

        deploy_output, _ = deploy.communicate(timeout=300)
        assert deploy.returncode == 0, f"prefect deploy --all failed ({deploy.returncode}):\n{deploy_output}"
        deployment = httpx.get(f"{stack.prefect_api}/deployments/name/arborl-retrain/arborl-retrain",
                               timeout=10).json()
        assert deployment["work_pool_name"] == stack.pool
        assert deployment["entrypoint"] == "flows/deployments.py:retrain"
        assert [s["schedule"]["cron"] for s in deployment["schedules"]] == ["0 3 * * 1"]
        phase("deploy")

        params = {"config": "configs/micro.yaml", "overrides": overrides, "iterations": 1}
        first_run = _deployment_run(stack, "arborl-retrain/arborl-retrain", params, repo_root)
        _finished(stack, first_run)
        phase("retrain week 1")

        client = MlflowClient(tracking_uri=stack.mlflow_url, registry_uri=stack.mlflow_url)
        v1, v2 = client.get_model_version(MODEL, "1"), client.get_model_version(MODEL, "2")
        run2 = client.get_run(v2.run_id)
        lineage = {"arborl.parent_version": "1", "arborl.data_snapshot": WEEK1}
        for tags in (v2.tags, run2.data.tags):  # on the registered version and on its MLflow run
            assert {k: tags.get(k) for k in lineage} == lineage, tags
            assert tags["arborl.config_hash"]
        assert v2.tags["gate.split"] == "val" and v2.tags["gate.champion_before"] == "1"
        promoted = v2.tags["gate.decision"] == "promote"
        champion_after_first = "2" if promoted else "1"
        assert v2.tags["gate.champion_after"] == champion_after_first
        assert client.get_model_version_by_alias(MODEL, "champion").version == champion_after_first
        # the MLflow run names the flow run of the training pipeline: a subflow of the deployment's flow run
        pipeline_run = httpx.get(f"{stack.prefect_api}/flow_runs/{run2.data.tags['prefect.flow_run_id']}",
                                 timeout=10).json()
        parent_task = httpx.get(f"{stack.prefect_api}/task_runs/{pipeline_run['parent_task_run_id']}",
                                timeout=10).json()
        assert parent_task["flow_run_id"] == first_run
        # artifacts went through the MLflow server into the bucket; the run's outputs were written there directly
        mlflow_keys = s3.keys("mlflow/")
        assert any(f"/{run2.info.run_id}/artifacts/" in k for k in mlflow_keys), mlflow_keys[:20]
        for version in (v1, v2):  # the logged models: MLflow 3 keeps them under models/<model id>/
            model_id = version.source.rsplit("/", 1)[-1]  # source: models:/<model id>
            assert any(k.endswith(f"/models/{model_id}/artifacts/model/model.safetensors") for k in mlflow_keys), (
                version.source, [k for k in mlflow_keys if "/models/" in k][:20])
        run_root = f"runs/weekly-{WEEK1}-from-v1/"
        run_keys = s3.keys(run_root)
        assert f"{run_root}parent_model/model.safetensors" in run_keys, run_keys[:40]
        assert f"{run_root}warmstart/_manifest.json" in run_keys

        # week 2: a newer snapshot (the other half of the train questions) becomes `latest`
        _arborl(["export-data", "--config", micro, "--out", f"{snapshots}/{WEEK2}", "--parts", "2", "--part", "1"],
                env, tmp_path)
        phase("snapshot week 2")
        second_run = _deployment_run(stack, "arborl-retrain/arborl-retrain", params, repo_root)
        _finished(stack, second_run)
        phase("retrain week 2")

    v3 = client.get_model_version(MODEL, "3")
    lineage = {"arborl.parent_version": champion_after_first, "arborl.data_snapshot": WEEK2}
    for tags in (v3.tags, client.get_run(v3.run_id).data.tags):
        assert {k: tags.get(k) for k in lineage} == lineage, tags
    assert v3.tags["gate.split"] == "val" and v3.tags["gate.champion_before"] == champion_after_first
    assert client.get_model_version_by_alias(MODEL, "champion").version == v3.tags["gate.champion_after"]
    assert s3.keys(f"runs/weekly-{WEEK2}-from-v{champion_after_first}/parent_model/")
    print(f"retrain deployment test: {time.monotonic() - started:.1f} s after the servers started: {phases}; "
          f"gate decisions v2 {v2.tags['gate.decision']}, v3 {v3.tags['gate.decision']}")
