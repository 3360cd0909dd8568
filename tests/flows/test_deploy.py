"""`prefect --no-prompt deploy --all` of prefect.yaml against a real Prefect server (`prefect server start` on
127.0.0.1, SQLite in a temporary PREFECT_HOME): both deployments land on the `arborl-process` pool with their
entrypoints, parameters, pull steps and the weekly schedule. The server also accepts the Kubernetes pool's base
job template (infra/k8s), which it checks against its variables. Running a deployment on a worker:
tests/integration/test_service.py."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
START_TIMEOUT_S = 120.0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(home: Path, api_url: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(PREFECT_HOME=str(home), PREFECT_PROFILES_PATH=str(home / "profiles.toml"), PREFECT_API_URL=api_url,
               PREFECT_SERVER_ANALYTICS_ENABLED="false", DO_NOT_TRACK="1", PREFECT_UI_ENABLED="false",
               NO_PROXY="127.0.0.1,localhost", no_proxy="127.0.0.1,localhost")
    return env


def _prefect(args: list[str], env: dict[str, str]) -> str:
    res = subprocess.run([str(BIN / "prefect"), *args], env=env, cwd=ROOT, capture_output=True, text=True,
                         timeout=180, stdin=subprocess.DEVNULL)
    assert res.returncode == 0, f"prefect {' '.join(args)} failed ({res.returncode}):\n{res.stdout}\n{res.stderr}"
    return res.stdout


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """A `prefect server start` of its own, stopped (its whole process group) afterwards; yields (api, env)."""
    tmp_path = tmp_path_factory.mktemp("prefect-server")
    port = _free_port()
    api = f"http://127.0.0.1:{port}/api"
    env = _env(tmp_path / "prefect-home", api)
    log = (tmp_path / "server.log").open("w")
    proc = subprocess.Popen([str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                            env=env, cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            try:
                if httpx.get(f"{api}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"prefect server did not start:\n{(tmp_path / 'server.log').read_text()[-4000:]}")
            time.sleep(0.5)
        yield api, env
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()


def test_deploy_all(server):
    """Both deployments of prefect.yaml, as the server stores them."""
    if not (ROOT / "flows" / "deployments.py").is_file():
        pytest.skip("flows/deployments.py (the deployments' entrypoints) is not in the tree yet")
    api, env = server
    _prefect(["work-pool", "create", "arborl-process", "--type", "process"], env)
    out = _prefect(["--no-prompt", "deploy", "--all"], env)
    assert "arborl-train/arborl-train" in out and "arborl-retrain/arborl-retrain" in out

    def deployment(name: str) -> dict:
        res = httpx.get(f"{api}/deployments/name/{name}/{name}", timeout=10)
        assert res.status_code == 200, f"{name}: {res.status_code} {res.text}"
        return res.json()

    train, retrain = deployment("arborl-train"), deployment("arborl-retrain")
    assert train["entrypoint"] == "flows/deployments.py:train"
    assert retrain["entrypoint"] == "flows/deployments.py:retrain"
    for d in (train, retrain):
        assert d["work_pool_name"] == "arborl-process"
        assert d["pull_steps"][-1] == {"prefect.deployments.steps.set_working_directory":
                                       {"directory": "{{ $ARBORL_HOME }}"}}  # resolved by the worker, not here
        assert d["parameters"]["config"] == "configs/tiny.yaml"
    assert train["schedules"] == []
    (schedule,) = retrain["schedules"]
    assert schedule["active"] and schedule["schedule"]["cron"] == "0 3 * * 1"
    assert schedule["schedule"]["timezone"] == "UTC"
    assert set(retrain["parameter_openapi_schema"]["properties"]) == {"config", "overrides", "iterations"}
    assert retrain["parameter_openapi_schema"]["required"] == ["config"]
    # the schedule really produces runs: the server's scheduler fills in the coming Mondays
    res = httpx.post(f"{api}/deployments/{retrain['id']}/schedule", json={"max_runs": 2}, timeout=30)
    assert res.status_code in (200, 201), res.text
    runs = httpx.post(f"{api}/flow_runs/filter", timeout=10, json={
        "deployments": {"id": {"any_": [retrain["id"]]}}, "sort": "EXPECTED_START_TIME_ASC"}).json()
    starts = [r["expected_start_time"] for r in runs]
    assert len(starts) >= 2 and all("T03:00:00" in s for s in starts[:2]), starts
    res = httpx.post(f"{api}/deployments/filter", json={}, timeout=10)
    assert sorted(d["name"] for d in res.json()) == ["arborl-retrain", "arborl-train"]


def test_server_accepts_the_kubernetes_base_job_template(server, tmp_path):
    """`prefect work-pool create --type kubernetes --base-job-template infra/k8s/...` succeeds and the pool
    keeps the GPU variable; the same template with a placeholder it does not declare is refused."""
    api, env = server
    bad = json.loads((ROOT / "infra" / "k8s" / "work-pool-base-job-template.json").read_text())
    del bad["variables"]["properties"]["gpu_count"]
    (tmp_path / "bad.json").write_text(json.dumps(bad))
    res = subprocess.run([str(BIN / "prefect"), "work-pool", "create", "bad-template", "--type", "kubernetes",
                          "--base-job-template", str(tmp_path / "bad.json")], env=env, cwd=ROOT, capture_output=True,
                         text=True, timeout=180, stdin=subprocess.DEVNULL)
    assert res.returncode != 0 and "gpu_count" in res.stdout + res.stderr, res.stdout + res.stderr
    template = ROOT / "infra" / "k8s" / "work-pool-base-job-template.json"
    _prefect(["work-pool", "create", "arborl-kubernetes", "--type", "kubernetes", "--base-job-template",
              str(template)], env)
    pool = httpx.get(f"{api}/work_pools/arborl-kubernetes", timeout=10).json()
    assert pool["type"] == "kubernetes"
    assert pool["base_job_template"]["variables"]["properties"]["gpu_count"]["type"] == "integer"
    job = pool["base_job_template"]["job_configuration"]["job_manifest"]
    assert job["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == \
        "{{ gpu_count }}"
