"""prefect.yaml, offline: Prefect's own parser accepts it, each deployment's entrypoint is a flow of the
repository that accepts the deployment's parameters, the retrain schedule is a valid weekly cron, and the pull
steps change into $ARBORL_HOME (or fail naming it). Deploying to a real server: tests/flows/test_deploy.py."""

from __future__ import annotations

import asyncio
import importlib.util
import os
from datetime import datetime, timezone
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
PREFECT_YAML = ROOT / "prefect.yaml"
DEPLOYMENTS = {"arborl-train": "flows/deployments.py:train", "arborl-retrain": "flows/deployments.py:retrain"}


@pytest.fixture(scope="module")
def spec() -> dict:
    return yaml.safe_load(PREFECT_YAML.read_text())


def _deployments(spec: dict) -> dict[str, dict]:
    return {d["name"]: d for d in spec["deployments"]}


def _flow(entrypoint: str):
    """The Prefect flow object an entrypoint `path.py:function` names, loaded from the repository."""
    path, func = entrypoint.split(":")
    file = ROOT / path
    if not file.is_file():
        pytest.skip(f"{path} is not in the tree yet")
    module_spec = importlib.util.spec_from_file_location("_arborl_deployments_under_test", file)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    assert hasattr(module, func), f"{entrypoint}: {path} defines no {func}"
    return getattr(module, func)


def test_prefect_parses_it(spec):
    """Prefect's own prefect.yaml model reads the file: project name, version, and the two deployments."""
    from prefect.cli.deploy._models import PrefectYamlModel

    model = PrefectYamlModel.model_validate(spec)
    assert model.name == "arborl"
    assert model.prefect_version and model.prefect_version.startswith("3.")
    assert {d.name: d.entrypoint for d in model.deployments} == DEPLOYMENTS
    assert {d.work_pool.name for d in model.deployments} == {"arborl-process"}
    assert not spec.get("build") and not spec.get("push")  # the process pool runs the checkout itself


def test_entrypoints_are_flows_that_accept_the_parameters(spec):
    """Each entrypoint is a Prefect flow named like its deployment; its signature accepts the deployment's
    parameters (Prefect's own parameter validation) and needs no other."""
    from prefect.flows import Flow

    for name, deployment in _deployments(spec).items():
        flow = _flow(deployment["entrypoint"])
        assert isinstance(flow, Flow), f"{deployment['entrypoint']} is not a Prefect flow"
        assert flow.name == name
        params = deployment.get("parameters") or {}
        assert "config" in params and (ROOT / params["config"]).is_file(), params
        flow.validate_parameters(params)
        with pytest.raises(Exception, match="not_a_parameter"):
            flow.validate_parameters({**params, "not_a_parameter": 1})


def test_retrain_runs_weekly_in_utc(spec):
    """arborl-retrain's one schedule: the cron Prefect accepts, firing Mondays 03:00 UTC; arborl-train has none."""
    from cronsim import CronSim
    from prefect.client.schemas.schedules import CronSchedule

    deployments = _deployments(spec)
    assert not deployments["arborl-train"].get("schedules") and not deployments["arborl-train"].get("schedule")
    (schedule,) = deployments["arborl-retrain"]["schedules"]
    assert schedule["timezone"] == "UTC" and schedule.get("active", True)
    CronSchedule(cron=schedule["cron"], timezone=schedule["timezone"])  # Prefect's validation
    fires = CronSim(schedule["cron"], datetime(2026, 12, 1, tzinfo=timezone.utc))  # a Tuesday
    first, second = next(fires), next(fires)
    assert first == datetime(2026, 12, 7, 3, 0, tzinfo=timezone.utc) and first.weekday() == 0
    assert (second - first).days == 7


def test_pool_variants_are_documented(spec):
    """The docker and kubernetes pool variants exist as anchors, with an image and a GPU request."""
    pools = spec["definitions"]["work_pools"]
    assert pools["process"]["name"] == "arborl-process"
    docker, k8s = pools["docker"], pools["kubernetes"]
    assert docker["job_variables"]["image"] and k8s["job_variables"]["image"]
    assert docker["job_variables"]["container_create_kwargs"]["device_requests"][0]["capabilities"] == [["gpu"]]
    assert k8s["job_variables"]["gpu_count"] >= 1
    for pool in (docker, k8s):  # the image's code is at /app
        assert pool["job_variables"]["env"]["ARBORL_HOME"] == "/app"
        assert pool["job_variables"]["image_pull_policy"] in ("IfNotPresent", "Always", "Never")


def _run_pull_steps(spec: dict) -> dict:
    """Run the pull steps as Prefect's `run_step` does (step outputs and environment variables templated in),
    minus its block and variable look-ups, which need an API server and which prefect.yaml does not use."""
    from prefect.deployments.steps.core import _get_function_for_step
    from prefect.utilities.templating import apply_values

    assert "prefect.blocks" not in str(spec["pull"]) and "prefect.variables" not in str(spec["pull"])
    outputs: dict = {}
    for step in spec["pull"]:
        ((fqn, inputs),) = step.items()
        inputs = {k: v for k, v in inputs.items() if k not in ("id", "requires")}
        inputs = apply_values(apply_values(inputs, outputs), dict(os.environ))
        result = _get_function_for_step(fqn)(**inputs)
        result = asyncio.run(result) if asyncio.iscoroutine(result) else result
        outputs.update(result)
        if "id" in step[fqn]:
            outputs[step[fqn]["id"]] = result
    return outputs


def test_pull_steps_change_into_arborl_home(spec, monkeypatch, tmp_path):
    """Prefect runs the pull steps as a worker's flow run would: they change into $ARBORL_HOME."""
    if not (ROOT / "flows" / "deployments.py").is_file():
        pytest.skip("flows/deployments.py is not in the tree yet")
    monkeypatch.chdir(tmp_path)  # restored afterwards, whatever the steps did
    monkeypatch.setenv("ARBORL_HOME", str(ROOT))
    outputs = _run_pull_steps(spec)
    assert Path(os.getcwd()).resolve() == ROOT.resolve()
    assert Path(outputs["directory"]).resolve() == ROOT.resolve()


@pytest.mark.parametrize("home", [None, "elsewhere"])
def test_pull_steps_name_a_missing_arborl_home(spec, monkeypatch, tmp_path, home):
    """Unset, or not a checkout: the flow run fails naming ARBORL_HOME, before any directory change."""
    monkeypatch.chdir(tmp_path)
    if home is None:
        monkeypatch.delenv("ARBORL_HOME", raising=False)
    else:
        monkeypatch.setenv("ARBORL_HOME", str(tmp_path / home))
    with pytest.raises(RuntimeError, match="ARBORL_HOME=.* is not an arborl checkout"):
        _run_pull_steps(spec)
    assert Path(os.getcwd()) == tmp_path
