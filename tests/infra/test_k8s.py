"""infra/k8s, offline: there is no Kubernetes cluster here, so nothing is applied. Every manifest validates
strictly (unknown fields are errors) against the Kubernetes API schemas of `kubernetes-validate`; the work
pool's base job template is rendered with Prefect's own templating, as a Kubernetes worker renders it for a flow
run, and the resulting Job validates too, with `nvidia.com/gpu` requested exactly when `gpu_count` is set.
That Prefect's server accepts the template: tests/flows/test_deploy.py."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "infra" / "k8s"
TEMPLATE = K8S / "work-pool-base-job-template.json"
MANIFESTS = ("namespace.yaml", "prefect-worker.yaml", "secrets.example.yaml")
VERSIONS = ("1.28.0", None)  # the oldest Kubernetes these manifests target, and the newest schemas known
GPU = "nvidia.com/gpu"


def _validate(resource: dict, where: str) -> None:
    """Strict validation against each of VERSIONS; a failure names the file, the field and the problem."""
    import kubernetes_validate

    for version in VERSIONS:
        version = version or kubernetes_validate.latest_version()
        try:
            kubernetes_validate.validate(resource, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            path = ".".join(map(str, exc.absolute_path))
            pytest.fail(f"{where}: {resource.get('kind')} invalid for Kubernetes {version} at {path}: "
                        f"{exc.message[:300]}")


def _resources() -> dict[tuple[str, str], dict]:
    found = {}
    for name in MANIFESTS:
        for doc in yaml.safe_load_all((K8S / name).read_text()):
            if doc:
                found[(doc["kind"], doc["metadata"]["name"])] = {**doc, "_file": name}
    return found


def _strip(doc: dict) -> dict:
    return {k: v for k, v in doc.items() if k != "_file"}


def test_manifests_validate():
    """Each manifest document is a valid Kubernetes object, in the namespace `arborl`."""
    resources = _resources()
    assert {kind for kind, _ in resources} == {"Namespace", "ServiceAccount", "Role", "RoleBinding", "Deployment",
                                              "Secret"}
    for (kind, name), doc in resources.items():
        _validate(_strip(doc), f"infra/k8s/{doc['_file']}")
        if kind != "Namespace":
            assert doc["metadata"]["namespace"] == "arborl", f"{kind}/{name}"


def _granted(resources: dict, account: str) -> dict[tuple[str, str], set[str]]:
    """{(apiGroup, resource): verbs} the Roles bound to ServiceAccount `account` grant."""
    assert ("ServiceAccount", account) in resources, account
    granted: dict[tuple[str, str], set[str]] = {}
    for (kind, _), binding in resources.items():
        if kind == "RoleBinding" and {"kind": "ServiceAccount", "name": account,
                                      "namespace": "arborl"} in binding["subjects"]:
            for rule in resources[("Role", binding["roleRef"]["name"])]["rules"]:
                for group in rule["apiGroups"]:
                    for res in rule["resources"]:
                        granted.setdefault((group, res), set()).update(rule["verbs"])
    return granted


def test_worker_and_flow_runs_may_create_jobs():
    """The worker's ServiceAccount may create and watch Jobs and read their pods; so may the flow-run pods'
    (what `orchestration.executor: kubernetes` calls: create a Job, read its status, list its pods, read a log)."""
    resources = _resources()
    deployment = resources[("Deployment", "prefect-worker")]["spec"]["template"]["spec"]
    worker = _granted(resources, deployment["serviceAccountName"])
    assert {"create", "get", "list", "watch", "delete"} <= worker[("batch", "jobs")]
    assert {"get", "list", "watch"} <= worker[("", "pods")] and "get" in worker[("", "pods/log")]
    runner = _granted(resources, "arborl-flow-runner")
    assert {"create", "get"} <= runner[("batch", "jobs")] and "get" in runner[("batch", "jobs/status")]
    assert "list" in runner[("", "pods")] and "get" in runner[("", "pods/log")]
    assert ("", "secrets") not in worker and ("", "secrets") not in runner
    (container,) = deployment["containers"]
    assert container["args"][:3] == ["prefect", "worker", "start"]
    assert container["args"][container["args"].index("--pool") + 1] == "arborl-kubernetes"
    assert container["livenessProbe"]["httpGet"]["path"] == "/health"


def test_secrets_are_placeholders():
    """secrets.example.yaml holds no credential: every value is a `<placeholder>` or contains one."""
    secrets = [doc for (kind, _), doc in _resources().items() if kind == "Secret"]
    assert {s["metadata"]["name"] for s in secrets} == {"arborl-s3", "arborl-db"}
    for secret in secrets:
        assert "data" not in secret  # base64 would hide a real value
        for key, value in secret["stringData"].items():
            assert "<" in value and ">" in value, f"{secret['metadata']['name']}.{key} = {value!r}"


@pytest.fixture(scope="module")
def template() -> dict:
    return json.loads(TEMPLATE.read_text())


def test_template_shape(template):
    """A Prefect base job template: `job_configuration` with a batch/v1 Job, and a JSON schema of `variables`
    that declares every placeholder the configuration uses."""
    import jsonschema
    from prefect.utilities.templating import find_placeholders

    assert set(template) == {"job_configuration", "variables"}
    jsonschema.Draft7Validator.check_schema(template["variables"])
    manifest = template["job_configuration"]["job_manifest"]
    assert (manifest["apiVersion"], manifest["kind"]) == ("batch/v1", "Job")
    used = {p.name for p in find_placeholders(template["job_configuration"])}
    assert used <= set(template["variables"]["properties"])
    assert {"gpu_count", "node_selector", "tolerations", "s3_secret_name", "image", "env"} <= used


def _render(template: dict, values: dict) -> dict:
    """The Job a Kubernetes worker submits for a flow run with these job variables: Prefect's templating of the
    configuration (variable defaults, then the values), then what the worker adds (its env prepended to the
    container's, the image, the flow-run command)."""
    from prefect.utilities.templating import apply_values
    from prefect.workers.base import BaseJobConfiguration

    variables = BaseJobConfiguration._get_base_config_defaults(template["variables"]["properties"])
    variables.update(values)
    config = apply_values(copy.deepcopy(template["job_configuration"]), variables)
    manifest = config["job_manifest"]
    container = manifest["spec"]["template"]["spec"]["containers"][0]
    env = config.get("env") if isinstance(config.get("env"), dict) else {}
    container["env"] = [{"name": k, "value": v} for k, v in env.items()] + container.get("env", [])
    container.setdefault("args", ["prefect", "flow-run", "execute"])
    manifest["metadata"].setdefault("generateName", "arborl-")
    return manifest


def _kubernetes_job_variables() -> dict:
    spec = yaml.safe_load((ROOT / "prefect.yaml").read_text())
    return spec["definitions"]["work_pools"]["kubernetes"]["job_variables"]


def test_prefect_yaml_kubernetes_variant_renders_a_gpu_job(template):
    """prefect.yaml's kubernetes job variables satisfy the template's variables schema (as Prefect's server
    checks them) and render to a valid Job requesting and limiting the GPU, on GPU nodes, with the S3 keys
    from the Secret."""
    import jsonschema

    values = _kubernetes_job_variables()
    jsonschema.validate(values, template["variables"])
    job = _render(template, values)
    _validate(job, str(TEMPLATE))
    pod = job["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["resources"]["limits"][GPU] == container["resources"]["requests"][GPU] == values["gpu_count"]
    assert pod["nodeSelector"] == values["node_selector"] and pod["tolerations"] == values["tolerations"]
    assert pod["serviceAccountName"] == "arborl-flow-runner" and job["metadata"]["namespace"] == "arborl"
    assert container["image"] == values["image"] and container["imagePullPolicy"] == "Always"
    refs = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in container["env"] if "valueFrom" in e}
    assert refs == {k: {"name": "arborl-s3", "key": k} for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")}
    plain = {e["name"]: e["value"] for e in container["env"] if "value" in e}
    assert plain["ARBORL_HOME"] == "/app"


def test_without_gpu_count_no_gpu_is_requested(template):
    """With only the template's defaults, the Job is still valid and asks for no GPU and no node selection."""
    job = _render(template, {})
    _validate(job, str(TEMPLATE))
    pod = job["spec"]["template"]["spec"]
    resources = pod["containers"][0]["resources"]
    assert GPU not in resources.get("limits", {}) and GPU not in resources.get("requests", {})
    assert "nodeSelector" not in pod and "tolerations" not in pod
    assert pod["containers"][0]["image"] == "arborl:latest" and job["metadata"]["namespace"] == "arborl"


def test_invalid_job_variables_are_rejected(template):
    """The variables schema refuses what would make a broken Job: a negative or fractional GPU count, a
    non-string node label."""
    import jsonschema

    for bad in ({"gpu_count": -1}, {"gpu_count": 0.5}, {"node_selector": {"gpu": True}}):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(bad, template["variables"])
